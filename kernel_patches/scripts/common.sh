# shellcheck shell=bash
# Common settings and helpers for the uffd_aio kernel lane scripts.
# Sourced by the other scripts in this folder; not meant to be run directly.

# --- locations -------------------------------------------------------------
KP_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KP_DIR=$(cd "$KP_SCRIPTS_DIR/.." && pwd)          # <repo>/kernel_patches
REPO_DIR=$(cd "$KP_DIR/.." && pwd)                 # <repo>

: "${UFFD_CACHE:=/var/cache/uffd-aio}"             # everything heavy lives here, outside the clone
: "${KERNEL_SRC_PKG:=linux-source-6.12}"
: "${KERNEL_SRC_TARBALL:=/usr/src/linux-source-6.12.tar.xz}"
: "${PATCH_DIR:=$KP_DIR/6.12}"                     # the series: $PATCH_DIR/series + NNNN-*.patch
: "${CONFIG_FRAGMENT:=$KP_DIR/config/uffd-vm.config}"
: "${JOBS:=2}"                                     # 2 cores, shared machine: never more than 2
: "${VNG_VENV:=$UFFD_CACHE/vng-venv}"
: "${VNG_MIN_VERSION:=1.30}"

CCACHE_DIR_DEFAULT=$UFFD_CACHE/ccache
KERNELS_DIR=$UFFD_CACHE/kernels
BUILD_ROOT=$UFFD_CACHE/build
LOG_DIR=$UFFD_CACHE/logs
RUNS_DIR=$UFFD_CACHE/runs
LOCK_DIR=$UFFD_CACHE/locks

# --- messages ---------------------------------------------------------------
ts() { date '+%H:%M:%S'; }
log() { printf '[%s] %s\n' "$(ts)" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$(ts)" "$*" >&2; exit 1; }

# Run a long command, logging to a file, printing a heartbeat every minute so
# the caller (CI, a terminal) sees progress. Returns the command's status.
#   run_logged <logfile> <label> cmd args...
run_logged() {
    local logfile=$1 label=$2; shift 2
    local start rc pid
    start=$(date +%s)
    log "$label: started (log: $logfile)"
    "$@" >>"$logfile" 2>&1 &
    pid=$!
    # If we are interrupted, do not leave a make -j2 running behind.
    trap 'kill "$pid" 2>/dev/null; exit 130' INT TERM
    while kill -0 "$pid" 2>/dev/null; do
        local i
        for i in $(seq 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$label: running for $(( $(date +%s) - start ))s; last: $(tail -n1 "$logfile" 2>/dev/null | cut -c1-100)"
        fi
    done
    rc=0
    wait "$pid" || rc=$?
    trap - INT TERM
    log "$label: finished with status $rc after $(( $(date +%s) - start ))s"
    return "$rc"
}

# --- inputs of a kernel build ----------------------------------------------

# Version of the installed source package (part of the cache key).
src_pkg_version() {
    dpkg-query -W -f='${Version}' "$KERNEL_SRC_PKG" 2>/dev/null || echo "not-installed"
}

# The patch file names listed in the series file, in order (quilt syntax:
# '#' comments and blank lines ignored, first word of each line is the file).
# Prints nothing when PATCHES=none or when the series file is missing/empty.
series_patches() {
    [ "${PATCHES:-series}" = none ] && return 0
    [ -f "$PATCH_DIR/series" ] || return 0
    sed -e 's/#.*//' "$PATCH_DIR/series" | awk 'NF { print $1 }'
}

# Hash of every input of the build: source package version, the series and
# the patch contents, the config fragment(s) and the build scripts themselves.
# An empty/missing series hashes the same as PATCHES=none.
kernel_key() {
    {
        echo "src: $KERNEL_SRC_PKG $(src_pkg_version)"
        local p
        while read -r p; do
            [ -f "$PATCH_DIR/$p" ] || die "series lists $p but $PATCH_DIR/$p does not exist"
            echo "patch: $p $(sha256sum < "$PATCH_DIR/$p" | cut -d' ' -f1)"
        done < <(series_patches)
        echo "config: $(sha256sum < "$CONFIG_FRAGMENT" | cut -d' ' -f1)"
        local f
        for f in ${EXTRA_CONFIG:-}; do
            echo "extra-config: $f $(sha256sum < "$KP_DIR/config/$f.config" | cut -d' ' -f1)"
        done
        echo "build-script: $(cat "$KP_SCRIPTS_DIR/build-kernel.sh" "$KP_SCRIPTS_DIR/common.sh" | sha256sum | cut -d' ' -f1)"
    } | sha256sum | cut -c1-16
}

# Human-readable label: "unpatched" or "patched".
kernel_flavour() {
    if [ -n "$(series_patches)" ]; then echo patched; else echo unpatched; fi
}

vng_bin() { echo "$VNG_VENV/bin/vng"; }
