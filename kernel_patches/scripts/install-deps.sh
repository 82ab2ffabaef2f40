#!/bin/bash
# Install what the kernel lane needs on a Debian 12 machine (idempotent, fast
# when everything is present):
#   - linux-source-6.12 (the kernel tarball in /usr/src)
#   - build deps: gcc/make, bc bison flex libelf-dev libssl-dev ccache cpio ...
#   - liburing-dev (for io_uring selftests)
#   - qemu-system-x86 and virtme-ng (PyPI, in a dedicated venv)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

APT_PKGS=(
    "$KERNEL_SRC_PKG"
    build-essential bc bison flex libelf-dev libssl-dev ccache cpio xz-utils
    kmod rsync python3 python3-venv liburing-dev
    qemu-system-x86 busybox-static
)

missing=()
for p in "${APT_PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt: installing ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    log "apt: all packages present"
fi
[ -f "$KERNEL_SRC_TARBALL" ] || die "$KERNEL_SRC_TARBALL missing after installing $KERNEL_SRC_PKG"

mkdir -p "$UFFD_CACHE" "$KERNELS_DIR" "$BUILD_ROOT" "$LOG_DIR" "$RUNS_DIR" "$LOCK_DIR" "$CCACHE_DIR_DEFAULT"

# virtme-ng in its own venv (the wheel ships the virtme-ng-init binary).
if ! "$VNG_VENV/bin/python" - "$VNG_MIN_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
def v(s): return tuple(int(x) for x in s.split(".")[:2])
sys.exit(0 if v(version("virtme-ng")) >= v(sys.argv[1]) else 1)
EOF
then
    log "virtme-ng: installing virtme-ng>=$VNG_MIN_VERSION into $VNG_VENV"
    (
        exec 9>"$LOCK_DIR/vng-venv.lock"
        flock 9
        [ -x "$VNG_VENV/bin/python" ] || python3 -m venv "$VNG_VENV"
        "$VNG_VENV/bin/pip" install -q "virtme-ng>=$VNG_MIN_VERSION"
    )
fi
log "virtme-ng: $("$VNG_VENV/bin/vng" --version 2>&1 | head -n1)"
