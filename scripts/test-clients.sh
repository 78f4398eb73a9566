#!/usr/bin/env bash
# Real clients against krun-oci: containerd 1.6 (`ctr`) with containerd-shim-krun-v2
# and with the stock runc shim pointed at krun-oci (--runc-binary), and podman 4.3
# with `--runtime krun-oci`. Starts its OWN containerd (own root/state/socket under
# a temp dir). After every scenario: no VM, helper, shim, socket or state left.
#
# usage: scripts/test-clients.sh ABS_KRUN_OCI ABS_SHIM_DIR
# env:   KRUN_OCI_INIT (guest init), KRUN_OCI_REQUIRE_VM=1 (a VM that cannot boot
#        fails the run instead of skipping the VM scenarios), ONLY="name ..." (subset).
# exit:  0 all ran and passed, 1 a check failed, 77 skipped (reason printed).
set -uo pipefail

KRUN_OCI=${1:?usage: $0 ABS_KRUN_OCI ABS_SHIM_DIR}
SHIM_DIR=${2:?usage: $0 ABS_KRUN_OCI ABS_SHIM_DIR}
# A TCG boot is slow and the first one may build the guest image: this bounds a
# hung client, it is not a performance assertion.
CMD_TIMEOUT=${CMD_TIMEOUT:-600}

skip() { echo "SKIP: $*"; exit 77; }
[ "$(id -u)" = 0 ] || skip "needs root (containerd, podman and VMs run as root here)"
for tool in containerd ctr podman timeout python3; do
	command -v "$tool" >/dev/null || skip "$tool is not installed"
done
[ -x "$KRUN_OCI" ] || skip "$KRUN_OCI is not built"
[ -x "$SHIM_DIR/containerd-shim-krun-v2" ] || skip "$SHIM_DIR/containerd-shim-krun-v2 is not built"

work=$(mktemp -d /tmp/krun-clients.XXXXXX)
ns="krun-test-$$"
failures=0
passed=0
skipped=0
containerd_pid=""

cleanup() {
	# An interrupted run: end what is still running (ours only: matched by our markers).
	if [ -n "$containerd_pid" ]; then
		local t
		for t in $(ctr task ls -q 2>/dev/null); do
			ctr task kill -s SIGKILL "$t" >/dev/null 2>&1
			ctr task rm -f "$t" >/dev/null 2>&1
		done
	fi
	local pid
	for pid in $(pgrep -f -- "$work|$ns" 2>/dev/null); do
		[ "$pid" != $$ ] && [ "$pid" != "$containerd_pid" ] && kill -9 "$pid" 2>/dev/null
	done
	if [ -n "$containerd_pid" ]; then
		kill "$containerd_pid" 2>/dev/null
		wait "$containerd_pid" 2>/dev/null
	fi
	tmux kill-session -t "krun-tty-$$" 2>/dev/null
	declare -F cni_cleanup >/dev/null && cni_cleanup
	umount -R "$work" 2>/dev/null
	rm -rf "$work"
	# Shims killed above leave their sockets (ours only: see assert_clean).
	local id
	if [ -n "${interrupted:-}" ] && [ -n "${sock:-}" ]; then
		for id in "${container_ids[@]}"; do
			rm -f "/run/containerd/s/$(printf '%s' "$sock/$ns/$id" | sha256sum | cut -d' ' -f1)"
		done
	fi
	# The runc shim leaves its (empty) per-namespace root behind; a runtime that
	# creates cgroups may leave the (empty) per-namespace parent.
	rmdir "/run/containerd/runc/$ns" 2>/dev/null
	find /sys/fs/cgroup -mindepth 1 -maxdepth 3 -type d -name "$ns" -exec rmdir {} + 2>/dev/null
}
trap cleanup EXIT
trap 'interrupted=1; exit 130' INT TERM

failure_lines=()
fail() {
	echo "  FAIL: $*"
	failures=$((failures + 1)); scenario_ok=0
	failure_lines+=("${current_scenario:-setup}: $*")
}
note() { echo "  $*"; }

# ---------- rootfs: busybox-static, applets linked relatively ----------
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,etc,tmp,proc,sys,dev,run,root}
cp /bin/busybox "$rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
	# The applet list names busybox itself: linking it would replace the binary.
	[ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
done
echo "root:x:0:0:root:/root:/bin/sh" >"$rootfs/etc/passwd"
echo "root:x:0:" >"$rootfs/etc/group"

# ---------- leak checks ----------
container_ids=(bad1 k1 r1 kt kk ke kty ki ri kp rp kc rc ko khc)
markers=("$work" "$ns")

leftover_processes() {
	local pat
	pat=$(printf '%s|' "${markers[@]}")
	pat=${pat%|}
	pgrep -af 'qemu-system|virtiofsd|vhost-device-vsock|containerd-shim|krun-oci|conmon' 2>/dev/null |
		grep -E -- "$pat" | grep -v -e "pgrep" -e "test-clients.sh" || true
}

# cgroup directories that name one of our containers: the ctr ids live under the
# namespace (cgroupsPath /<namespace>/<id>), podman's are named after the container
# ID (libpod_parent/libpod-<ID>, or a systemd scope). Hybrid hosts mount the v1
# controllers and the v2 tree side by side under /sys/fs/cgroup: one bounded find
# covers both, and a pure v2 host.
leftover_cgroups() {
	local pat="/$ns/" cid
	for cid in "${podman_ids[@]:-}"; do
		[ -n "$cid" ] && pat+="|$cid"
	done
	find /sys/fs/cgroup -mindepth 1 -maxdepth 5 -type d 2>/dev/null | grep -E -- "$pat" || true
}

# Runs `$@` until it prints nothing, bounded by a count (teardown is asynchronous);
# prints what it printed last.
settle() {
	local n=0 left
	while :; do
		left=$("$@")
		[ -z "$left" ] && break
		n=$((n + 1))
		[ $n -ge 300 ] && break
		sleep 0.1
	done
	printf '%s' "$left"
}

assert_clean() {
	local what=$1 left
	# Teardown is asynchronous (TaskDelete, shim Shutdown, VM power-off): wait for
	# it to settle, bounded by a count, never by asserting a duration.
	left=$(settle leftover_processes)
	[ -z "$left" ] || fail "$what: processes left: $left"
	left=$(settle leftover_cgroups)
	[ -z "$left" ] || fail "$what: cgroups left: $(tr '\n' ' ' <<<"$left")"
	local dir
	for dir in "$work/shim-state/$ns" "/run/containerd/runc/$ns"; do
		if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
			fail "$what: state left in $dir: $(ls -A "$dir" | tr '\n' ' ')"
		fi
	done
	if [ -d "$work/shim-state/sockets" ] && [ -n "$(ls -A "$work/shim-state/sockets")" ]; then
		fail "$what: files left in the shim's socket dir: $(ls -A "$work/shim-state/sockets")"
	fi
	# Other containerds share /run/containerd/s: look only for our shims' sockets,
	# named sha256("<containerd address>/<namespace>/<id>") by both shims.
	local id hash
	for id in "${container_ids[@]}"; do
		hash=$(printf '%s' "$sock/$ns/$id" | sha256sum | cut -d' ' -f1)
		[ -e "/run/containerd/s/$hash" ] && fail "$what: shim socket of $id left: /run/containerd/s/$hash"
	done
	local cid
	for cid in "${podman_ids[@]:-}"; do
		[ -n "$cid" ] && [ -e "/run/krun-oci/$cid" ] && fail "$what: krun-oci state left: /run/krun-oci/$cid"
	done
}

# ---------- containerd of our own ----------
cdir="$work/containerd"
mkdir -p "$cdir"
sock="$cdir/containerd.sock"
cat >"$cdir/config.toml" <<EOF
version = 2
root = "$cdir/root"
state = "$cdir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  level = "debug"
EOF
# The host config file the shims (and the krun-oci they run) read: empty = defaults.
host_config="$work/krun-config.toml"
: >"$host_config"
PATH="$SHIM_DIR:$PATH" KRUN_OCI_SHIM_ROOT="$work/shim-state" KRUN_OCI_BINARY="$KRUN_OCI" \
	KRUN_OCI_CONFIG="$host_config" containerd --config "$cdir/config.toml" >"$cdir/containerd.log" 2>&1 &
containerd_pid=$!
ctr() { timeout "$CMD_TIMEOUT" ctr --address "$sock" --namespace "$ns" "$@"; }
for _ in $(seq 1 300); do
	ctr version >/dev/null 2>&1 && break
	kill -0 "$containerd_pid" 2>/dev/null || { cat "$cdir/containerd.log"; skip "containerd did not start"; }
	sleep 0.1
done
ctr version >/dev/null 2>&1 || { tail -20 "$cdir/containerd.log"; skip "containerd did not answer on $sock"; }

# ---------- podman, isolated storage ----------
podman_ids=()
podman_base=(podman --root "$work/podman/root" --runroot "$work/podman/run"
	--cgroup-manager cgroupfs --events-backend file)
podman() { timeout "$CMD_TIMEOUT" "${podman_base[@]}" "$@"; }
# The same as one shell command line, for script(1) and tmux: no timeout(1) there,
# it would put podman out of the terminal's foreground process group.
podman_line() { printf '%q ' "${podman_base[@]}" "$@"; }
# podman passes the runtime a scrubbed environment: a wrapper (same basename,
# podman goes by it) carries KRUN_OCI_INIT for builds that are not installed.
podman_runtime="$KRUN_OCI"
if [ -n "${KRUN_OCI_INIT:-}" ]; then
	mkdir -p "$work/bin"
	podman_runtime="$work/bin/krun-oci"
	printf '#!/bin/sh\nKRUN_OCI_INIT=%q exec %q "$@"\n' "$KRUN_OCI_INIT" "$KRUN_OCI" >"$podman_runtime"
	chmod +x "$podman_runtime"
fi
# --rootfs is a switch: the rootfs path is the positional argument, so it goes last.
podman_run_flags=(--runtime "$podman_runtime" --network none
	--ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --rootfs "$rootfs")

# ---------- scenarios ----------
selected() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
run_scenario() {
	local name=$1
	selected "$name" || return 0
	echo "== $name"
	current_scenario=$name
	scenario_ok=1
	"scenario_$name"
	assert_clean "$name"
	if [ $scenario_ok = 1 ]; then passed=$((passed + 1)); echo "  ok"; fi
}
expect_rc() { [ "$2" = "$3" ] || fail "$1: exit code $2, expected $3"; }
expect_out() { grep -q -- "$3" <<<"$2" || fail "$1: output lacks '$3': $(head -c 600 <<<"$2")"; }

# Without a VM: a bad command must fail create with runc's words, through the shim.
scenario_shim_create_error() {
	local out rc
	out=$(ctr run --rm --runtime io.containerd.krun.v2 --rootfs "$rootfs" bad1 /no/such/binary 2>&1); rc=$?
	[ $rc != 0 ] || fail "create of a missing binary succeeded"
	expect_out "shim error" "$out" "no such file or directory"
	ctr containers rm bad1 >/dev/null 2>&1
}

scenario_shim_run() {
	local out rc
	out=$(ctr run --rm --runtime io.containerd.krun.v2 --rootfs "$rootfs" k1 sh -c 'echo hello-from-shim; echo to-stderr >&2; exit 3' 2>&1); rc=$?
	expect_rc "shim run" $rc 3
	expect_out "shim run" "$out" "hello-from-shim"
	expect_out "shim run" "$out" "to-stderr"
}

scenario_runc_shim_run() {
	local out rc
	out=$(ctr run --rm --runtime io.containerd.runc.v2 --runc-binary "$KRUN_OCI" --rootfs "$rootfs" r1 sh -c 'echo hello-from-runc-shim; exit 4' 2>&1); rc=$?
	expect_rc "runc shim run" $rc 4
	expect_out "runc shim run" "$out" "hello-from-runc-shim"
}

# Waits until `$2` prints `$1` (the workload installed its trap: signals sent before
# that would kill a shell that has no handler yet).
wait_output() {
	local want=$1 n=0
	shift
	until "$@" 2>/dev/null | grep -q -- "$want"; do
		n=$((n + 1))
		[ $n -ge 6000 ] && { fail "never printed '$want'"; return 1; }
		sleep 0.1
	done
}

wait_task_running() {
	local id=$1 n=0
	until ctr task ls 2>/dev/null | grep -E "^$id[[:space:]].*RUNNING" >/dev/null; do
		n=$((n + 1))
		[ $n -ge 6000 ] && { fail "task $id never ran"; return 1; }
		sleep 0.1
	done
}

# ctr task kill: SIGTERM runs the workload's trap; SIGKILL gives 137.
kill_scenario() {
	local runtime_flags=("$@") out rc pid
	# Truncate before the job starts: a redirection in the background job itself
	# races with the wait below, which could read the previous scenario's output.
	: >"$work/kt.out"
	ctr run --rm "${runtime_flags[@]}" --rootfs "$rootfs" kt sh -c 'trap "echo trapped; exit 42" TERM; echo ready; while :; do sleep 1; done' >>"$work/kt.out" 2>&1 &
	pid=$!
	if wait_output ready cat "$work/kt.out"; then
		ctr task kill kt || fail "ctr task kill failed"
	else
		ctr task kill -s SIGKILL kt 2>/dev/null
	fi
	wait $pid; rc=$?
	expect_rc "kill TERM" $rc 42
	expect_out "kill TERM" "$(cat "$work/kt.out")" "trapped"
	: >"$work/kk.out"
	ctr run --rm "${runtime_flags[@]}" --rootfs "$rootfs" kk sh -c 'trap "" TERM; echo ready; while :; do sleep 1; done' >>"$work/kk.out" 2>&1 &
	pid=$!
	if wait_output ready cat "$work/kk.out"; then
		ctr task kill -s SIGKILL kk || fail "ctr task kill -s SIGKILL failed"
	fi
	wait $pid; rc=$?
	expect_rc "kill KILL" $rc 137
}
scenario_shim_kill() { kill_scenario --runtime io.containerd.krun.v2; }
scenario_runc_shim_kill() { kill_scenario --runtime io.containerd.runc.v2 --runc-binary "$KRUN_OCI"; }

# `ctr events` into FILE in the background (its pid in $events_pid), returning once
# the subscription is up: an event published now comes through.
subscribe_events() {
	local file=$1 n=0
	: >"$file"
	timeout "$CMD_TIMEOUT" ctr --address "$sock" events >>"$file" 2>&1 &
	events_pid=$!
	ctr namespaces create "$ns" >/dev/null 2>&1
	until grep -q "/namespaces/update" "$file"; do
		n=$((n + 1))
		[ $n -ge 600 ] && { fail "ctr events never subscribed"; break; }
		ctr namespaces label "$ns" krun-test-sync="$n" >/dev/null 2>&1
		sleep 0.1
	done
}

exec_scenario() {
	local runtime_flags=("$@") out rc events_pid
	subscribe_events "$work/events.out"
	ctr run -d "${runtime_flags[@]}" --rootfs "$rootfs" ke sh -c 'while :; do sleep 1; done' >/dev/null 2>&1 ||
		{ fail "ctr run -d failed"; return; }
	wait_task_running ke || return
	out=$(ctr task exec --exec-id e1 ke sh -c 'echo exec-out; exit 5' 2>&1); rc=$?
	if grep -q "not implemented\|Unimplemented" <<<"$out"; then
		fail "exec: not available yet: $out"
	else
		expect_rc "exec" $rc 5
		expect_out "exec" "$out" "exec-out"
	fi
	ctr task kill -s SIGKILL ke
	ctr task rm ke >/dev/null 2>&1 || { sleep 1; ctr task rm -f ke >/dev/null 2>&1; }
	ctr containers rm ke >/dev/null 2>&1 || fail "container ke could not be removed"
	kill $events_pid 2>/dev/null
	wait $events_pid 2>/dev/null
	local topic events
	events=$(grep " $ns " "$work/events.out")
	for topic in /tasks/create /tasks/start /tasks/exec-added /tasks/exec-started /tasks/exit /tasks/delete; do
		grep -q " $topic " <<<"$events" || fail "exec: no $topic event: $events"
	done
	# The task's own TaskExit comes before its TaskDelete.
	local last_exit first_delete
	last_exit=$(grep -n " /tasks/exit " <<<"$events" | tail -1 | cut -d: -f1)
	first_delete=$(grep -n " /tasks/delete " <<<"$events" | head -1 | cut -d: -f1)
	[ -n "$last_exit" ] && [ -n "$first_delete" ] && [ "$last_exit" -lt "$first_delete" ] ||
		fail "exec: TaskExit does not precede TaskDelete: $events"
}
scenario_shim_exec() { exec_scenario --runtime io.containerd.krun.v2; }
scenario_runc_shim_exec() { exec_scenario --runtime io.containerd.runc.v2 --runc-binary "$KRUN_OCI"; }

# ctr run -t under tmux: the pty comes through the console socket; keys go in, output
# and the exit code come out; `ctr task exec -t` alongside.
tty_scenario() {
	local runtime_flags=("$@") session="krun-tty-$$" rc n screen
	command -v tmux >/dev/null && command -v script >/dev/null ||
		{ fail "tmux or script(1) missing: tty scenario cannot run"; return; }
	rm -f "$work/tty.rc"
	tmux new-session -d -s "$session" -x 120 -y 30 \
		"ctr --address $sock --namespace $ns run -t --rm ${runtime_flags[*]} --rootfs $rootfs kty sh; echo \$? >$work/tty.rc"
	wait_task_running kty || { tmux kill-session -t "$session" 2>/dev/null; return; }
	wait_output '#' tmux capture-pane -p -t "$session"
	tmux send-keys -t "$session" '[ -t 0 ] && echo "tty-$((6*7))"' Enter
	wait_output tty-42 tmux capture-pane -p -t "$session"
	# ctr wants a terminal for -t: script(1) gives it one (and returns its status).
	screen=$(timeout "$CMD_TIMEOUT" script -eqc "ctr --address $sock --namespace $ns task exec -t --exec-id et kty sh -c '[ -t 1 ] && echo exec-tty-ok; exit 6'" /dev/null 2>&1 </dev/null); rc=$?
	expect_rc "exec -t" $rc 6
	expect_out "exec -t" "$screen" "exec-tty-ok"
	tmux send-keys -t "$session" 'exit 9' Enter
	n=0
	while [ ! -s "$work/tty.rc" ] && [ $n -lt 3000 ]; do n=$((n + 1)); sleep 0.1; done
	rc=$(cat "$work/tty.rc" 2>/dev/null)
	expect_rc "ctr run -t" "$rc" 9
	tmux kill-session -t "$session" 2>/dev/null
}
scenario_shim_tty() { tty_scenario --runtime io.containerd.krun.v2; }
scenario_runc_shim_tty() { tty_scenario --runtime io.containerd.runc.v2 --runc-binary "$KRUN_OCI"; }

scenario_podman_run() {
	local out rc
	rm -f "$work/cid"
	out=$(podman run --rm --cidfile "$work/cid" "${podman_run_flags[@]}" sh -c 'echo hello-podman; exit 7' 2>&1); rc=$?
	podman_ids+=("$(cat "$work/cid" 2>/dev/null)")
	markers+=("${podman_ids[-1]:-$work}")
	expect_rc "podman run" $rc 7
	expect_out "podman run" "$out" "hello-podman"
}

# `podman run -d "$@"` with the common flags: the ID goes to the caller's $cid and
# to the leak checks (stdout only: a warning on stderr is not part of the ID).
podman_detached() {
	cid=$(podman run -d "${podman_run_flags[@]}" "$@" 2>"$work/podman-run.err") ||
		{ fail "podman run -d: $cid $(cat "$work/podman-run.err")"; cid=""; return 1; }
	podman_ids+=("$cid")
	markers+=("$cid")
}

# podman stop is graceful: the SIGTERM trap runs, no SIGKILL fallback (exit 0, not 137).
scenario_podman_stop() {
	local cid code logs
	podman_detached sh -c 'trap "echo got-term; exit 0" TERM; echo started; while :; do sleep 1; done' || return
	wait_output started podman logs "$cid"
	podman stop -t 300 "$cid" >/dev/null || fail "podman stop failed"
	code=$(podman inspect --format '{{.State.ExitCode}}' "$cid")
	expect_rc "podman stop" "$code" 0
	logs=$(podman logs "$cid" 2>&1)
	expect_out "podman stop" "$logs" "got-term"
	podman rm -f "$cid" >/dev/null || fail "podman rm failed"
}

# podman exec (conmon -> krun-oci exec --detach): exit code and output; -t gets a pty.
scenario_podman_exec() {
	local cid out rc
	podman_detached sh -c 'echo started; while :; do sleep 1; done' || return
	wait_output started podman logs "$cid"
	out=$(podman exec "$cid" sh -c 'echo exec-out; exit 5' 2>&1); rc=$?
	expect_rc "podman exec" $rc 5
	expect_out "podman exec" "$out" "exec-out"
	# podman wants a terminal for -t: script(1) gives it one (and returns its status).
	if command -v script >/dev/null; then
		out=$(timeout "$CMD_TIMEOUT" script -eqc "$(podman_line exec -t "$cid" sh -c '[ -t 1 ] && echo exec-tty-ok; exit 6')" /dev/null 2>&1 </dev/null); rc=$?
		expect_rc "podman exec -t" $rc 6
		expect_out "podman exec -t" "$out" "exec-tty-ok"
	else
		fail "script(1) missing: podman exec -t cannot run"
	fi
	podman rm -f "$cid" >/dev/null || fail "podman rm -f failed"
}

# ---------- networking ----------
# A server on the host (all addresses, so also the bridges' gateways) that the
# guests fetch from; started once, by the first scenario that needs it.
host_port=18091
host_server_pid=""
host_server() {
	[ -n "$host_server_pid" ] && return 0
	mkdir -p "$work/www-host"
	echo from-the-host >"$work/www-host/host.txt"
	/bin/busybox httpd -f -p "0.0.0.0:$host_port" -h "$work/www-host" &
	host_server_pid=$!
	local n=0
	until grep -q ":$(printf '%04X' $host_port) 00000000:0000 0A" /proc/net/tcp; do
		n=$((n + 1))
		[ $n -ge 100 ] && { fail "the host's test server did not listen"; return 1; }
		sleep 0.1
	done
}

# podman's default network (netavark bridge, no --network none): a published port
# reaches the guest's server from the host, the guest reaches the bridge's gateway,
# and the guest resolves with the resolv.conf podman made.
scenario_podman_network() {
	local cid out logs resolv line
	host_server || return
	cid=$(podman run -d --runtime "$podman_runtime" --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
		-p 18080:80 --rootfs "$rootfs" sh -c 'mkdir -p /tmp/www; echo page-from-the-guest >/tmp/www/index.html
			gw=$(ip route | sed -n "s/^default via \([0-9.]*\).*/\1/p")
			echo "gateway=$gw fetched=$(timeout 20 wget -q -O - http://$gw:'"$host_port"'/host.txt)"
			sed "s/^/resolv: /" /etc/resolv.conf
			httpd -p 80 -h /tmp/www; echo serving; while :; do sleep 1; done' 2>"$work/podman-run.err") ||
		{ fail "podman run -d -p: $cid $(cat "$work/podman-run.err")"; return; }
	podman_ids+=("$cid")
	markers+=("$cid")
	if wait_output serving podman logs "$cid"; then
		out=$(curl -s -m 30 http://127.0.0.1:18080/ 2>&1)
		expect_out "podman -p 18080:80" "$out" "page-from-the-guest"
		logs=$(podman logs "$cid" 2>&1)
		expect_out "podman network" "$logs" "fetched=from-the-host"
		resolv=$(cat "$(podman inspect --format '{{.ResolvConfPath}}' "$cid")")
		[ -n "$resolv" ] || fail "podman network: podman made no resolv.conf"
		while IFS= read -r line; do
			[ -n "$line" ] && ! grep -qxF -- "resolv: $line" <<<"$logs" &&
				fail "podman network: the guest's resolv.conf lacks '$line': $logs"
		done <<<"$resolv"
	fi
	podman rm -f "$cid" >/dev/null || fail "podman rm failed"
}

# ctr run --cni: ctr runs CNI on /proc/<task pid>/ns/net between create and start
# (bridge + host-local + portmap from Debian's containernetworking-plugins). The
# guest gets the address and reaches the bridge's gateway.
cni_net="krun-test-$$"
cni_bridge="krbr$$"
cni_conf=/etc/cni/net.d/00-$cni_net.conflist
cni_made_bin=""
cni_setup() {
	[ -e "$cni_conf" ] && return 0
	[ -x /usr/lib/cni/bridge ] || { fail "containernetworking-plugins is not installed"; return 1; }
	# ctr looks in the CNI defaults only: plugins in /opt/cni/bin, configs in /etc/cni/net.d.
	if [ ! -e /opt/cni/bin ]; then
		mkdir -p /opt/cni && ln -s /usr/lib/cni /opt/cni/bin && cni_made_bin=1
	fi
	mkdir -p /etc/cni/net.d
	cat >"$cni_conf" <<EOF
{"cniVersion": "0.4.0", "name": "$cni_net", "plugins": [
  {"type": "bridge", "bridge": "$cni_bridge", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.99.0.0/24", "gateway": "10.99.0.1"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
}
cni_cleanup() {
	[ -n "${host_server_pid:-}" ] && kill "$host_server_pid" 2>/dev/null
	rm -f "$cni_conf"
	[ -n "$cni_made_bin" ] && rm -f /opt/cni/bin && rmdir /opt/cni 2>/dev/null
	ip link del "$cni_bridge" 2>/dev/null
	rm -rf "/var/lib/cni/networks/$cni_net" "/var/lib/cni/results/$cni_net"-*
}
cni_scenario() {
	local id=$1 out rc
	shift
	host_server && cni_setup || return
	out=$(ctr run --rm --cni "$@" --rootfs "$rootfs" "$id" sh -c \
		'ip -o -4 addr show eth0; echo "fetched=$(timeout 20 wget -q -O - http://10.99.0.1:'"$host_port"'/host.txt)"' 2>&1); rc=$?
	expect_rc "ctr run --cni" $rc 0
	expect_out "ctr run --cni" "$out" "inet 10.99.0."
	expect_out "ctr run --cni" "$out" "fetched=from-the-host"
}
# The guest's OOM killer ends the workload: exit 137 and containerd's TaskOOM
# (/tasks/oom) from containerd-shim-krun-v2 (the stock runc shim watches the host
# cgroup of the VM, which never sees the guest's OOM kill).
scenario_shim_oom() {
	local out rc events_pid n=0
	subscribe_events "$work/oom-events.out"
	out=$(ctr run --rm --runtime io.containerd.krun.v2 --memory-limit 134217728 --rootfs "$rootfs" ko tail /dev/zero 2>&1); rc=$?
	expect_rc "OOM kill" $rc 137
	n=0
	until grep " $ns " "$work/oom-events.out" | grep -q " /tasks/oom "; do
		n=$((n + 1))
		[ $n -ge 100 ] && { fail "no /tasks/oom event: $(grep " $ns " "$work/oom-events.out")"; break; }
		sleep 0.1
	done
	kill $events_pid 2>/dev/null
	wait $events_pid 2>/dev/null
}

# The host config file (/etc/krun-oci/config.toml; KRUN_OCI_CONFIG here) holds for
# containerd-shim-krun-v2 as for the CLI: `vmm = "libkrun"` makes the shim's create use
# libkrun (on a host without hardware KVM it fails, naming libkrun).
scenario_shim_host_config() {
	local out rc
	echo 'vmm = "libkrun"' >"$host_config"
	: >"$work/khc.out"
	ctr run -d --runtime io.containerd.krun.v2 --rootfs "$rootfs" khc sleep 100000 >>"$work/khc.out" 2>&1; rc=$?
	out=$(cat "$work/khc.out")
	if [ $rc = 0 ]; then
		local vmm
		vmm=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["vmm"])' \
			"$work/shim-state/$ns/khc/state.json" 2>&1)
		[ "$vmm" = libkrun ] || fail "host config: vmm=libkrun, yet the shim's VM is '$vmm'"
		ctr task kill -s SIGKILL khc >/dev/null 2>&1
		ctr task rm -f khc >/dev/null 2>&1
	else
		expect_out "host config" "$out" "libkrun"
	fi
	ctr containers rm khc >/dev/null 2>&1
	: >"$host_config"
}

scenario_shim_cni() { cni_scenario kc --runtime io.containerd.krun.v2; }
scenario_runc_shim_cni() { cni_scenario rc --runtime io.containerd.runc.v2 --runc-binary "$KRUN_OCI"; }

# podman update (runtime `update --resources FILE`): the CPU quota lands on the VM's
# host cgroup, which holds QEMU and its helpers.
scenario_podman_update() {
	local cid quota
	podman_detached sh -c 'echo started; while :; do sleep 1; done' || return
	wait_output started podman logs "$cid"
	podman update --cpu-quota 50000 --cpu-period 100000 "$cid" >/dev/null 2>"$work/update.err" ||
		fail "podman update: $(cat "$work/update.err")"
	quota=$(find /sys/fs/cgroup -path "*$cid*" \( -name cpu.cfs_quota_us -o -name cpu.max \) \
		-exec cat {} + 2>/dev/null | head -n1)
	case "$quota" in 50000*) ;; *) fail "VM cgroup cpu quota after podman update: '$quota'" ;; esac
	podman rm -f "$cid" >/dev/null || fail "podman rm -f failed"
}

# podman logs has stdout and stderr; podman kill is SIGKILL (the TERM trap is moot): 137.
scenario_podman_logs_kill() {
	local cid code logs
	podman_detached sh -c 'trap "" TERM; echo to-stdout; echo to-stderr >&2; echo started; while :; do sleep 1; done' || return
	wait_output started podman logs "$cid"
	logs=$(podman logs "$cid" 2>&1)
	expect_out "podman logs" "$logs" "to-stdout"
	expect_out "podman logs" "$logs" "to-stderr"
	podman kill "$cid" >/dev/null || fail "podman kill failed"
	# kill does not wait for the exit: podman wait does (and prints the code).
	code=$(podman wait "$cid" 2>&1) || fail "podman wait: $code"
	expect_rc "podman wait after kill" "$code" 137
	code=$(podman inspect --format '{{.State.ExitCode}}' "$cid")
	expect_rc "podman kill" "$code" 137
	podman rm "$cid" >/dev/null || fail "podman rm failed"
}

# podman rm -f on a running container: stopped and removed, nothing listed after.
scenario_podman_rm_force() {
	local cid out
	podman_detached sh -c 'echo started; while :; do sleep 1; done' || return
	wait_output started podman logs "$cid"
	out=$(podman rm -f "$cid" 2>&1) || fail "podman rm -f: $out"
	out=$(podman ps -a --no-trunc --format '{{.ID}}')
	grep -q -- "$cid" <<<"$out" && fail "podman ps -a still lists $cid"
}

# Whether the host cgroup at `$1` (a cgroupsPath) is frozen: v1 freezer or v2 cgroup.freeze.
cgroup_frozen() {
	if [ -f "/sys/fs/cgroup/freezer$1/freezer.state" ]; then
		grep -q FROZEN "/sys/fs/cgroup/freezer$1/freezer.state"
	else
		grep -q 1 "/sys/fs/cgroup$1/cgroup.freeze" 2>/dev/null
	fi
}

# ctr task pause/resume: the task reads PAUSED and the VM's host cgroup is frozen;
# after resume the workload goes on (its counter moves).
pause_scenario() {
	local id=$1 out n
	shift
	ctr run -d "$@" --rootfs "$rootfs" "$id" sh -c 'i=0; while :; do i=$((i+1)); echo $i >/tmp/count; sleep 0.1; done' >/dev/null 2>&1 ||
		{ fail "ctr run -d failed"; return; }
	wait_task_running "$id" || return
	ctr task pause "$id" || fail "ctr task pause failed"
	ctr task ls | grep -E "^$id[[:space:]].*PAUSED" >/dev/null || fail "task not PAUSED: $(ctr task ls)"
	cgroup_frozen "/$ns/$id" || fail "the VM's cgroup /$ns/$id is not frozen"
	out=$(ctr task exec --exec-id p1 "$id" true 2>&1) && fail "exec in a paused task succeeded"
	ctr task resume "$id" || fail "ctr task resume failed"
	wait_task_running "$id"
	cgroup_frozen "/$ns/$id" && fail "the VM's cgroup is still frozen after resume"
	# The workload runs again: its counter moves on from what it reads now.
	local first now
	first=$(ctr task exec --exec-id p2 "$id" cat /tmp/count 2>/dev/null)
	n=0
	while :; do
		now=$(ctr task exec --exec-id "p3-$n" "$id" cat /tmp/count 2>/dev/null)
		[ -n "$now" ] && [ "$now" != "$first" ] && break
		n=$((n + 1))
		[ $n -ge 300 ] && { fail "the counter stayed at '$first' after resume"; break; }
		sleep 0.1
	done
	ctr task kill -s SIGKILL "$id"
	n=0
	until ctr task rm "$id" >/dev/null 2>&1 || [ $n -ge 300 ]; do n=$((n + 1)); sleep 0.1; done
	ctr containers rm "$id" >/dev/null 2>&1 || fail "container $id could not be removed"
}
scenario_shim_pause() { pause_scenario kp --runtime io.containerd.krun.v2; }
scenario_runc_shim_pause() { pause_scenario rp --runtime io.containerd.runc.v2 --runc-binary "$KRUN_OCI"; }

# podman pause/unpause.
scenario_podman_pause() {
	local cid status
	podman_detached sh -c 'echo started; while :; do sleep 1; done' || return
	wait_output started podman logs "$cid"
	podman pause "$cid" >/dev/null || fail "podman pause failed"
	status=$(podman inspect --format '{{.State.Status}}' "$cid")
	expect_rc "podman pause status" "$status" paused
	podman unpause "$cid" >/dev/null || fail "podman unpause failed"
	status=$(podman inspect --format '{{.State.Status}}' "$cid")
	expect_rc "podman unpause status" "$status" running
	podman rm -f "$cid" >/dev/null || fail "podman rm -f failed"
}

# podman run -it under tmux: keys in, output and the exit code out.
scenario_podman_it() {
	local session="krun-tty-$$" rc n cid
	command -v tmux >/dev/null || { fail "tmux missing: podman run -it cannot run"; return; }
	rm -f "$work/podman-it.rc" "$work/podman-it.cid"
	tmux new-session -d -s "$session" -x 120 -y 30 \
		"$(podman_line run -it --rm --cidfile "$work/podman-it.cid" "${podman_run_flags[@]}" sh); echo \$? >$work/podman-it.rc"
	n=0
	while [ ! -s "$work/podman-it.cid" ] && [ $n -lt 6000 ]; do n=$((n + 1)); sleep 0.1; done
	cid=$(cat "$work/podman-it.cid" 2>/dev/null)
	if [ -n "$cid" ]; then
		podman_ids+=("$cid")
		markers+=("$cid")
	fi
	if wait_output '#' tmux capture-pane -p -t "$session"; then
		tmux send-keys -t "$session" '[ -t 0 ] && echo "tty-$((6*7))"' Enter
		wait_output tty-42 tmux capture-pane -p -t "$session"
		tmux send-keys -t "$session" 'exit 9' Enter
	fi
	n=0
	while [ ! -s "$work/podman-it.rc" ] && [ $n -lt 3000 ]; do n=$((n + 1)); sleep 0.1; done
	rc=$(cat "$work/podman-it.rc" 2>/dev/null)
	expect_rc "podman run -it" "$rc" 9
	[ -s "$work/podman-it.rc" ] || note "screen: $(tmux capture-pane -p -t "$session" 2>/dev/null | grep -v '^$' | tail -5)"
	tmux kill-session -t "$session" 2>/dev/null
	[ -n "$cid" ] && podman rm -f "$cid" >/dev/null 2>&1
}

# An OCI image layout (one gzip layer: the busybox rootfs and a marker file), built
# offline; containerd imports it, unpacks it with its snapshotter (overlayfs) and
# hands the shim the rootfs mounts in CreateTask.
image_ref="krun-test.local/busybox:latest"
build_oci_image() {
	[ -s "$work/image.tar" ] && return 0
	python3 - "$rootfs" "$work/image.tar" <<'PY'
import gzip, hashlib, io, json, sys, tarfile

rootfs, out = sys.argv[1:3]
blobs = {}

def blob(data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest, len(data)

def as_root(info):
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info

buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as layer:
    layer.add(rootfs, arcname=".", filter=as_root)
    marker = b"from-image-layer\n"
    info = tarfile.TarInfo("etc/image-marker")
    info.size, info.mode = len(marker), 0o644
    layer.addfile(info, io.BytesIO(marker))
diff_id = "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()
layer_digest, layer_size = blob(gzip.compress(buf.getvalue(), mtime=0))
platform = {"architecture": "amd64", "os": "linux"}
config = dict(platform, config={"Env": ["PATH=/bin"], "Cmd": ["sh"]},
              rootfs={"type": "layers", "diff_ids": [diff_id]})
config_digest, config_size = blob(json.dumps(config).encode())
manifest = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": config_digest, "size": config_size},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest, "size": layer_size}],
}
manifest_digest, manifest_size = blob(json.dumps(manifest).encode())
index = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "digest": manifest_digest, "size": manifest_size, "platform": platform,
                   "annotations": {"org.opencontainers.image.ref.name": "latest"}}],
}
files = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
         "index.json": json.dumps(index).encode()}
for digest, data in blobs.items():
    files["blobs/sha256/" + digest.split(":")[1]] = data
with tarfile.open(out, "w") as archive:
    for name, data in files.items():
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        archive.addfile(info, io.BytesIO(data))
PY
}

# ctr images import, then ctr run IMAGE: the rootfs comes from the snapshotter.
image_scenario() {
	local id=$1 out rc
	shift
	build_oci_image || { fail "building the OCI image layout failed"; rm -f "$work/image.tar"; return; }
	out=$(ctr images import --base-name "${image_ref%:*}" "$work/image.tar" 2>&1) ||
		{ fail "ctr images import: $out"; return; }
	out=$(ctr images ls -q 2>&1)
	grep -qx -- "$image_ref" <<<"$out" || { fail "ctr images ls lacks $image_ref: $out"; return; }
	out=$(ctr run --rm "$@" "$image_ref" "$id" sh -c 'cat /etc/image-marker; echo from-image; exit 3' 2>&1); rc=$?
	expect_rc "run image" $rc 3
	expect_out "run image" "$out" "from-image-layer"
	expect_out "run image" "$out" "from-image"
	ctr containers rm "$id" >/dev/null 2>&1
	# The shim mounted the snapshot at <bundle>/rootfs: nothing of it stays mounted.
	out=$(settle grep -F -- "/$ns/$id/" /proc/self/mountinfo)
	[ -z "$out" ] || fail "run image: mounts left: $out"
	out=$(ctr images rm --sync "$image_ref" 2>&1) || fail "ctr images rm: $out"
}
scenario_shim_image() { image_scenario ki --runtime io.containerd.krun.v2; }
scenario_runc_shim_image() { image_scenario ri --runtime io.containerd.runc.v2 --runc-binary "$KRUN_OCI"; }

# Does a VM boot at all here? If not, every VM scenario would fail for that one reason.
vm_probe() {
	local b="$work/probe" out
	mkdir -p "$b"
	ln -s "$rootfs" "$b/rootfs"
	"$KRUN_OCI" spec --bundle "$b" >/dev/null
	python3 - "$b/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["process"]["terminal"] = False
c["process"]["args"] = ["true"]
json.dump(c, open(sys.argv[1], "w"))
PY
	out=$(timeout "$CMD_TIMEOUT" "$KRUN_OCI" --root "$work/probe-state" run --bundle "$b" probe 2>&1 </dev/null) && return 0
	"$KRUN_OCI" --root "$work/probe-state" delete --force probe >/dev/null 2>&1
	echo "$out" | tail -3
	return 1
}

vm_scenarios=(shim_run runc_shim_run shim_kill runc_shim_kill shim_exec runc_shim_exec shim_tty runc_shim_tty
	shim_image runc_shim_image shim_pause runc_shim_pause podman_run podman_stop podman_exec podman_logs_kill
	podman_rm_force podman_pause podman_update podman_it podman_network shim_cni runc_shim_cni shim_oom shim_host_config)
wanted=()
for s in "${vm_scenarios[@]}"; do selected "$s" && wanted+=("$s"); done

run_scenario shim_create_error
if [ ${#wanted[@]} = 0 ]; then
	:
elif ! reason=$(vm_probe); then
	echo "VM probe: no microVM boots here: $reason"
	if [ "${KRUN_OCI_REQUIRE_VM:-0}" = 1 ]; then
		fail "KRUN_OCI_REQUIRE_VM=1 but no VM boots"
	else
		echo "SKIP: VM scenarios (${wanted[*]}): no VM boots"
		skipped=1
	fi
else
	for s in "${wanted[@]}"; do
		run_scenario "$s"
	done
fi

echo "== $passed passed, $failures failed$([ $skipped = 1 ] && echo ', VM scenarios skipped')"
if [ $failures != 0 ]; then
	# Warnings and errors only (debug lines would bury them); the failures come
	# last so that a CI log cut to its tail still names them.
	echo "-- containerd log (warnings and errors, tail):"
	grep -E 'level=(warning|error|fatal)' "$cdir/containerd.log" | tail -20 | cut -c1-600
	echo "-- failures:"
	printf '  %s\n' "${failure_lines[@]}"
	echo "== $passed passed, $failures failed"
	exit 1
fi
[ $skipped = 1 ] && exit 77
exit 0
