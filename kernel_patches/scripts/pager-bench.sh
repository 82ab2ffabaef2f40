#!/bin/bash
# Per-fault cost of the Python pager in the VM: stock ioctl path vs the series'
# write interface (io_uring WRITE on the UFFDIO_WRITE_FD fd) vs write + poll mode.
#
# Usage: pager-bench.sh [pager-bench.py arguments...]
#        make -C kernel_patches pager-bench [BENCH_ARGS="--rounds 9 --pages 3000"]
#
# One boot of the patched kernel runs every configuration, interleaved round by
# round (same guest, same run: the ratios are what count under TCG); then, unless
# UNPATCHED=0, one boot of the unpatched kernel runs the ioctl configuration as a
# cross-check (a different boot: compare its absolute value with care).
# Needs the repo's .venv (the top-level README's test command creates it) and
# the cached kernels (make -C kernel_patches kernel kernel-unpatched).
#
# Environment: KERNEL (default kernels/latest-patched), UNPATCHED_KERNEL
# (default kernels/latest-unpatched), UNPATCHED=0 to skip that boot, VM_TIMEOUT.
# Results: $RUNS_DIR/pager-bench-<date>-XXXX/{patched,unpatched}/{table.md,pager-bench.json}
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${KERNEL:=$KERNELS_DIR/latest-patched}"
: "${UNPATCHED_KERNEL:=$KERNELS_DIR/latest-unpatched}"
: "${UNPATCHED:=1}"
: "${VM_TIMEOUT:=1500}"
export VM_TIMEOUT VM_QUIET=1
[ -x "$REPO_DIR/.venv/bin/python" ] || die "no $REPO_DIR/.venv: create it first (top-level README)"
mkdir -p "$RUNS_DIR"
OUT=$(mktemp -d "$RUNS_DIR/pager-bench-$(date +%Y%m%d-%H%M%S)-XXXX")
ARGS=$(printf ' %q' "$@")

run_in() {  # run_in <label> <kernel> [extra args]
    local label=$1 kernel=$2; shift 2
    mkdir -p "$OUT/$label"
    log "pager-bench: $label kernel ($(basename "$(readlink -f "$kernel")")), results in $OUT/$label"
    RESULT_DIR="$OUT/$label" "$KP_SCRIPTS_DIR/vm-run.sh" "$kernel" \
        "cd '$REPO_DIR' && .venv/bin/python kernel_patches/scripts/pager-bench.py --json \"\$RESULT_DIR/pager-bench.json\"$ARGS $* >\"\$RESULT_DIR/table.md\""
    cat "$OUT/$label/guest-info"
    cat "$OUT/$label/table.md"
    echo
}

run_in patched "$KERNEL"
if [ "$UNPATCHED" != 0 ] && [ -e "$UNPATCHED_KERNEL" ]; then
    run_in unpatched "$UNPATCHED_KERNEL" --configs ioctl
fi
log "pager-bench: done, $OUT"
