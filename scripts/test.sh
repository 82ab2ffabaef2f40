#!/bin/bash
# The test command: set up (bootstrap.sh), run the test suite on this machine's kernel,
# then the kernel lane: build (or reuse) the patched 6.12 kernel, boot it in QEMU, run
# the upstream uffd selftests (against an unpatched build too), the new selftests and
# this suite inside the guest.  SKIP_KERNEL=1 skips the kernel lane.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '\n[test] %s\n' "$*" >&2; }

scripts/bootstrap.sh
log "pytest (host kernel $(uname -r))"
# run-bounded.py: past HOST_SUITE_TIMEOUT s (default 2400) it saves every thread's state
# and stacks, kills the run and exits 124 (a hang pytest-timeout cannot see, docs in the script)
.venv/bin/python scripts/run-bounded.py -- .venv/bin/python -m pytest tests -p no:cacheprovider -q -ra "$@"
if [ "${SKIP_KERNEL:-0}" != 1 ]; then
    log "kernel lane: make -C kernel_patches kernel-regress"
    make -C kernel_patches kernel-regress
fi
log "all tests passed"
