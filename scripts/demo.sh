#!/usr/bin/env bash
# The main job: a busybox container in its own microVM, driven like runc.
set -euo pipefail
KRUN_OCI=${1:-krun-oci}
work=$(mktemp -d /tmp/krun-oci-demo.XXXXXX)
root="$work/state"
trap '"$KRUN_OCI" --root "$root" delete --force demo >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

echo "== bundle: busybox-static rootfs in $work/bundle"
mkdir -p "$work/bundle/rootfs/bin" "$work/bundle/rootfs"/{etc,tmp,proc,sys,dev,run}
cp /bin/busybox "$work/bundle/rootfs/bin/busybox"
for applet in $("$work/bundle/rootfs/bin/busybox" --list); do
	[ "$applet" = busybox ] || ln -sf busybox "$work/bundle/rootfs/bin/$applet"
done
"$KRUN_OCI" spec --bundle "$work/bundle"
python3 - "$work/bundle/config.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["process"]["terminal"] = False
c["process"]["args"] = ["sh", "-c", "echo \"hello from $(uname -sr) in a microVM, $(nproc) vCPUs\"; cat /proc/cmdline; exit 3"]
c["root"]["readonly"] = False
json.dump(c, open(p, "w"), indent=2)
PY

echo "== krun-oci check"
"$KRUN_OCI" check || true

echo "== create (boots the VM; the main process waits)"
start=$(date +%s.%N)
"$KRUN_OCI" --root "$root" create --bundle "$work/bundle" --pid-file "$work/pid" demo
echo "create took $(echo "$(date +%s.%N) - $start" | bc) s; monitor pid $(cat "$work/pid")"
"$KRUN_OCI" --root "$root" state demo
echo "== start"
"$KRUN_OCI" --root "$root" start demo
while [ "$("$KRUN_OCI" --root "$root" state demo | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')" != stopped ]; do
	sleep 0.1
done
echo "== state after the workload exited"
"$KRUN_OCI" --root "$root" state demo
echo "== logs (json-file)"
"$KRUN_OCI" --root "$root" logs --timestamps demo
"$KRUN_OCI" --root "$root" delete demo
echo "== deleted; nothing left:"
ls "$root"
