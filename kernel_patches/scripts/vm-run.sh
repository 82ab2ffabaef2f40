#!/bin/bash
# Run one shell command inside a virtme-ng guest (QEMU TCG, 9p root = the host's /).
#
# Usage: vm-run.sh <bzImage | kernels/<key> dir> <command...>
#
# The command runs with bash -c in the guest, in the caller's current directory,
# with UFFD_AIO_IN_VM=1, PYTHONDONTWRITEBYTECODE=1 and PYTHONUNBUFFERED=1 set,
# KERNEL_DIR=<the kernels/<key> folder> (selftests in $KERNEL_DIR/selftests) and
# RESULT_DIR=<the writable results folder>. The host's root
# filesystem is visible read-only (the results folder is writable).
# Its stdout+stderr are streamed to this script's stdout while the guest runs and
# kept in <results>/output.log; its exit status is this script's exit status.
#
# Exit status: the command's own status, or
#   124  the guest hit the timeout (VM_TIMEOUT) and was killed
#   125  the guest ended without reporting a status (panic, oops in init, ...)
#
# Environment:
#   VM_TIMEOUT=600      hard limit for the whole boot+run, seconds
#   VM_MEMORY=2G VM_CPUS=2
#   RESULT_DIR=<dir>    where output.log/status/console.log go (default: a new
#                       folder under /var/cache/uffd-aio/runs/); printed at the end
#   VM_QUIET=1          do not stream output.log (still written)
#   VM_RWDIRS="a b"     extra host folders the guest may write
#   VM_RODIRS="a b"     extra host folders to show read-only (needed for paths
#                       under /var/cache, /var/tmp, /var/log: tmpfs in the guest)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[ $# -ge 2 ] || { sed -n '2,25p' "$0" >&2; exit 2; }
KIMG=$1; shift
[ -d "$KIMG" ] && KIMG=$KIMG/bzImage
[ -f "$KIMG" ] || die "no kernel image: $KIMG"
KDIR_GIVEN=$(cd "$(dirname "$KIMG")" && pwd -L)   # e.g. kernels/latest-patched
KIMG=$(readlink -f "$KIMG")
KDIR=$(dirname "$KIMG")                           # e.g. kernels/<key>
CMD="$*"

VNG=$(vng_bin)
if [ ! -x "$VNG" ]; then
    "$KP_SCRIPTS_DIR/install-deps.sh"
fi

: "${VM_TIMEOUT:=600}"
: "${VM_MEMORY:=2G}"
: "${VM_CPUS:=2}"
mkdir -p "$RUNS_DIR"
if [ -z "${RESULT_DIR:-}" ]; then
    RESULT_DIR=$(mktemp -d "$RUNS_DIR/$(date +%Y%m%d-%H%M%S)-XXXX")
fi
mkdir -p "$RESULT_DIR"
RESULT_DIR=$(readlink -f "$RESULT_DIR")
rm -f "$RESULT_DIR/status" "$RESULT_DIR/output.log" "$RESULT_DIR/done"
: >"$RESULT_DIR/output.log"

# The guest-side wrapper: the command's output and status go into files (the
# guest console is not reliable).
printf '%s\n' "$CMD" >"$RESULT_DIR/cmd.sh"
cat >"$RESULT_DIR/guest-wrapper.sh" <<EOF
#!/bin/bash
export UFFD_AIO_IN_VM=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export RESULT_DIR='$RESULT_DIR' KERNEL_DIR='$KDIR'
cd '$PWD' 2>/dev/null || cd /
echo "guest: \$(uname -r) \$(nproc) cpus, \$(grep MemTotal /proc/meminfo)" >'$RESULT_DIR/guest-info'
rc=0
bash '$RESULT_DIR/cmd.sh' >>'$RESULT_DIR/output.log' 2>&1 </dev/null || rc=\$?
echo "\$rc" >'$RESULT_DIR/status'
sync
EOF
chmod +x "$RESULT_DIR/guest-wrapper.sh"

RW_ARGS=(--rwdir "$RESULT_DIR")
for d in ${VM_RWDIRS:-}; do RW_ARGS+=(--rwdir "$d"); done
# virtme-ng-init puts tmpfs on /var/cache, /var/tmp, /var/log...: host folders
# there are invisible in the guest unless passed explicitly. Always pass the
# kernel's folder (kernels/<key>/ holds the selftests) and, if it lives
# under /var, the repository.
RO_DIRS=("$KDIR")
# The symlinked name (kernels/latest-*) works in the guest too.
[ "$KDIR_GIVEN" = "$KDIR" ] || RO_DIRS+=("$KDIR_GIVEN=$KDIR")
case $REPO_DIR in /var/*) RO_DIRS+=("$REPO_DIR") ;; esac
for d in ${VM_RODIRS:-}; do RO_DIRS+=("$d"); done
for d in "${RO_DIRS[@]}"; do RW_ARGS+=(--rodir "$d"); done

log "vm: booting $(basename "$(dirname "$KIMG")")/$(basename "$KIMG") (timeout ${VM_TIMEOUT}s, results in $RESULT_DIR)"
TAIL_PID=""
if [ "${VM_QUIET:-0}" != 1 ]; then
    tail -n +1 -F "$RESULT_DIR/output.log" 2>/dev/null &
    TAIL_PID=$!
fi
T0=$(date +%s)
vrc=0
# vng runs virtme-run (same venv) which execs qemu; timeout kills it.
PATH="$(dirname "$VNG"):$PATH" timeout --kill-after=20 "$VM_TIMEOUT" \
    "$VNG" --run "$KIMG" --disable-kvm --force-9p \
        --cpus "$VM_CPUS" --memory "$VM_MEMORY" \
        --qemu-opts="-accel tcg,thread=single" \
        "${RW_ARGS[@]}" \
        --exec "bash $RESULT_DIR/guest-wrapper.sh" \
        </dev/null >"$RESULT_DIR/console.log" 2>&1 || vrc=$?
ELAPSED=$(( $(date +%s) - T0 ))
if [ -n "$TAIL_PID" ]; then
    sleep 0.5
    kill "$TAIL_PID" 2>/dev/null || true
    wait "$TAIL_PID" 2>/dev/null || true
fi
echo "$ELAPSED" >"$RESULT_DIR/elapsed"

if [ "$vrc" = 124 ] || [ "$vrc" = 137 ]; then
    log "vm: TIMEOUT after ${ELAPSED}s (limit ${VM_TIMEOUT}s); console: $RESULT_DIR/console.log"
    tail -n 15 "$RESULT_DIR/console.log" >&2 || true
    echo "$RESULT_DIR"  >&2
    exit 124
fi
if [ ! -s "$RESULT_DIR/status" ]; then
    log "vm: guest ended after ${ELAPSED}s without a status (vng exit $vrc); console: $RESULT_DIR/console.log"
    tail -n 25 "$RESULT_DIR/console.log" >&2 || true
    exit 125
fi
rc=$(cat "$RESULT_DIR/status")
log "vm: command exited with status $rc (vng $vrc, ${ELAPSED}s); output: $RESULT_DIR/output.log"
exit "$rc"
