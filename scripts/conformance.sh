#!/usr/bin/env bash
# Runs the conformance suite against runc (the oracle) and krun-oci, and writes the side-by-side
# table docs/conformance.md. Usage: scripts/conformance.sh [KRUN_OCI_BINARY]
# Env: RUNC (default: runc on PATH), KRUN_OCI_INIT (the static guest init, needed by krun-oci),
#      CONFORMANCE_FILTER (comma-separated patterns), CONFORMANCE_TIMEOUT (seconds per runtime
#      command against krun-oci; a VM boots in create), CONFORMANCE_OUT (results dir).
# Exit status: 0 iff both runtimes fail only tests listed in conformance/expected-differences.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
KRUN=${1:-$PWD/target/debug/krun-oci}
RUNC=${RUNC:-$(command -v runc || echo /usr/sbin/runc)}
OUT=${CONFORMANCE_OUT:-$PWD/target/conformance}
FILTER=${CONFORMANCE_FILTER:-}
KRUN_TIMEOUT=${CONFORMANCE_TIMEOUT:-180}
EXPECTED=conformance/expected-differences.txt
export KRUN_OCI_INIT=${KRUN_OCI_INIT:-$PWD/target/x86_64-unknown-linux-gnu/release/krun-oci-init}

set -e
$CARGO build -q -p krun-oci-conformance --bin conformance
# The checker runs inside a busybox rootfs: it must be static.
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
	$CARGO build -q -p krun-oci-conformance --bin conformance-checker \
	--target x86_64-unknown-linux-gnu --release
set +e
RUNNER=$PWD/target/debug/conformance
mkdir -p "$OUT" docs
filter=()
[ -n "$FILTER" ] && filter=(--filter "$FILTER")

echo "== runc ($RUNC)"
"$RUNNER" run --runtime "$RUNC" --runtime-name runc --timeout 30 "${filter[@]}" \
	--expected-failures "$EXPECTED" --json-out "$OUT/runc.json" | tee "$OUT/runc.tap"
rc_runc=${PIPESTATUS[0]}

echo "== krun-oci ($KRUN)"
"$RUNNER" run --runtime "$KRUN" --runtime-name krun-oci --timeout "$KRUN_TIMEOUT" \
	--test-timeout $((KRUN_TIMEOUT * 4)) --preflight "${filter[@]}" \
	--expected-failures "$EXPECTED" --json-out "$OUT/krun-oci.json" | tee "$OUT/krun-oci.tap"
rc_krun=${PIPESTATUS[0]}

"$RUNNER" compare --oracle "$OUT/runc.json" --subject "$OUT/krun-oci.json" \
	--expected "$EXPECTED" -o docs/conformance.md || exit 2
echo "wrote docs/conformance.md (runc: exit $rc_runc, krun-oci: exit $rc_krun)"
[ "$rc_runc" = 0 ] && [ "$rc_krun" = 0 ]
