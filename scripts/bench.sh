#!/usr/bin/env bash
# make bench: figures for docs/benchmarks.md, printed, never asserted.
# Usage: scripts/bench.sh KRUN_OCI_BINARY [-n N] [--tb-sizes 16,32,...] [--skip-distro]
# (N also from $BENCH_N, tb-sizes from $BENCH_TB_SIZES). Needs root (runc, VMs).
set -euo pipefail
exec python3 "$(dirname "$0")/bench.py" "$@"
