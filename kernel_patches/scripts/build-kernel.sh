#!/bin/bash
# Build (or fetch from the cache) the uffd_aio test kernel and its selftests.
#
# Usage: build-kernel.sh            # apply kernel_patches/6.12/series
#        PATCHES=none build-kernel.sh   # the unpatched Debian 6.12 kernel
#
# Environment:
#   PATCHES=none        ignore the series (unpatched kernel, for regression runs)
#   EXTRA_CONFIG="x y"  also merge kernel_patches/config/{x,y}.config (e.g. debug)
#   KEEP_BUILD=1        keep the unpacked source/object tree after a successful build
#   FORCE=1             rebuild even if the cache has this key
#   UFFD_CACHE          cache root (default /var/cache/uffd-aio)
#
# Result: $UFFD_CACHE/kernels/<key>/ with bzImage, config, System.map,
# selftests/ (uffd-* selftest binaries), info.txt. The last line printed on
# stdout is that directory (everything else goes to stderr).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

"$KP_SCRIPTS_DIR/install-deps.sh"

# Snapshot the series first: the patch engineer may commit while we build, and
# the key, the applied patches and info.txt must all describe the same inputs.
mkdir -p "$BUILD_ROOT"
SNAP=$(mktemp -d "$BUILD_ROOT/.series-XXXXXX")
trap 'rm -rf "$SNAP"' EXIT
while read -r p; do
    [ -f "$PATCH_DIR/$p" ] || die "series lists $p but $PATCH_DIR/$p does not exist"
    mkdir -p "$(dirname "$SNAP/$p")"
    cp "$PATCH_DIR/$p" "$SNAP/$p"
    echo "$p" >>"$SNAP/series"
done < <(series_patches)
touch "$SNAP/series"
PATCH_DIR=$SNAP    # series_patches/kernel_key now read the snapshot

KEY=$(kernel_key)
FLAVOUR=$(kernel_flavour)
OUT=$KERNELS_DIR/$KEY
log "kernel $FLAVOUR, key $KEY ($(series_patches | wc -l) patches, $KERNEL_SRC_PKG $(src_pkg_version))"

link_latest() {
    ln -sfn "$KEY" "$KERNELS_DIR/latest-$FLAVOUR"
}

if [ -f "$OUT/bzImage" ] && [ -f "$OUT/info.txt" ] && [ "${FORCE:-0}" != 1 ]; then
    log "cache hit: $OUT"
    link_latest
    echo "$OUT"
    exit 0
fi

# One build per key at a time (other engineers share this machine).
mkdir -p "$LOCK_DIR"
exec 8>"$LOCK_DIR/build-$KEY.lock"
if ! flock -n 8; then
    log "another build of $KEY is running; waiting for it"
    flock 8
    if [ -f "$OUT/bzImage" ] && [ "${FORCE:-0}" != 1 ]; then
        log "cache hit after wait: $OUT"
        link_latest
        echo "$OUT"
        exit 0
    fi
fi

T0=$(date +%s)
WORK=$BUILD_ROOT/$KEY
SRC=$WORK/src
OBJ=$WORK/obj
BLOG=$LOG_DIR/build-$KEY.log
mkdir -p "$LOG_DIR"
: >"$BLOG"
log "build log: $BLOG"

# --- 1. fresh source tree ---------------------------------------------------
if [ -e "$WORK" ]; then    # left over by an interrupted build: move it away
    mv "$WORK" "$BUILD_ROOT/.trash-$KEY-$$-old"
fi
# Delete trees of earlier builds in the background (slow on a busy disk).
for t in "$BUILD_ROOT"/.trash-*; do
    [ -e "$t" ] && { nohup rm -rf "$t" </dev/null >/dev/null 2>&1 & }
done
mkdir -p "$WORK"
log "unpacking $KERNEL_SRC_TARBALL"
tar -C "$WORK" -xf "$KERNEL_SRC_TARBALL"
mv "$WORK"/linux-source-6.12 "$SRC"
cp "$SRC/tools/testing/selftests/mm/run_vmtests.sh" "$WORK/run_vmtests.sh.orig"

# --- 2. apply the series ----------------------------------------------------
n=0
while read -r p; do
    n=$((n + 1))
    log "applying [$n] $p"
    if (cd "$SRC" && git apply --whitespace=nowarn -p1 "$PATCH_DIR/$p") >>"$BLOG" 2>&1; then
        continue
    fi
    echo "--- git apply failed for $p:" >&2
    (cd "$SRC" && git apply --check -v -p1 "$PATCH_DIR/$p" 2>&1 | tail -n 20) >&2 || true
    log "git apply failed for $p; trying patch -p1 (fuzz allowed, see log)"
    if ! (cd "$SRC" && patch -p1 --forward --batch --no-backup-if-mismatch < "$PATCH_DIR/$p") >>"$BLOG" 2>&1; then
        tail -n 20 "$BLOG" >&2
        die "patch $p does not apply to $KERNEL_SRC_PKG $(src_pkg_version)"
    fi
    log "WARNING: $p applied only with patch(1) (offset/fuzz); refresh it with git format-patch"
done < <(series_patches)
log "applied $n patch(es)"

# --- 3. configure ------------------------------------------------------------
export CCACHE_DIR=${CCACHE_DIR:-$CCACHE_DIR_DEFAULT}
export CCACHE_BASEDIR=$UFFD_CACHE          # relative paths => hits across per-key trees
export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-8G}
export CCACHE_COMPILERCHECK=content
export CCACHE_SLOPPINESS=time_macros
export KBUILD_BUILD_TIMESTAMP="uffd-aio $KEY" KBUILD_BUILD_USER=uffd-aio KBUILD_BUILD_HOST=uffd-aio
KMAKE=(make -C "$SRC" O="$OBJ" -j"$JOBS" CC="ccache gcc" HOSTCC="ccache gcc")

mkdir -p "$OBJ"
ALLCONFIG=$OBJ/uffd-allconfig
cat "$CONFIG_FRAGMENT" >"$ALLCONFIG"
for f in ${EXTRA_CONFIG:-}; do
    [ -f "$KP_DIR/config/$f.config" ] || die "no such config fragment: $KP_DIR/config/$f.config"
    cat "$KP_DIR/config/$f.config" >>"$ALLCONFIG"
done
log "configuring: allnoconfig + $(basename "$CONFIG_FRAGMENT") ${EXTRA_CONFIG:-}"
"${KMAKE[@]}" KCONFIG_ALLCONFIG="$ALLCONFIG" allnoconfig >>"$BLOG" 2>&1
"${KMAKE[@]}" olddefconfig >>"$BLOG" 2>&1
# Every "=y"/"=value" in the fragments must survive (else a dependency is missing).
bad=0
while IFS='=' read -r k v; do
    got=$(grep -E "^$k=" "$OBJ/.config" | cut -d= -f2- || true)
    if [ "$got" != "$v" ]; then
        log "config: $k wanted $v, got ${got:-unset}"
        bad=1
    fi
done < <(grep -E '^CONFIG_[A-Za-z0-9_]+=' "$ALLCONFIG")
while read -r k; do
    if grep -qE "^$k=" "$OBJ/.config"; then
        log "config: $k should be off but is $(grep -E "^$k=" "$OBJ/.config")"
        bad=1
    fi
done < <(grep -E '^# CONFIG_[A-Za-z0-9_]+ is not set' "$ALLCONFIG" | awk '{print $2}')
[ "$bad" = 0 ] || die "config fragment not satisfied (see above)"
log "config ok: $(grep -c '=y' "$OBJ/.config") options =y"

# --- 4. build the kernel ------------------------------------------------------
ccache -z >/dev/null 2>&1 || true
TB=$(date +%s)
run_logged "$BLOG" "make bzImage" "${KMAKE[@]}" bzImage || { tail -n 40 "$BLOG" >&2; die "kernel build failed"; }
KBUILD_SECS=$(( $(date +%s) - TB ))

# --- 5. headers + selftests ------------------------------------------------------
log "make headers_install"
"${KMAKE[@]}" headers_install >>"$BLOG" 2>&1 || { tail -n 20 "$BLOG" >&2; die "headers_install failed"; }

MM=$SRC/tools/testing/selftests/mm
STOUT=$OBJ/selftests-mm
mkdir -p "$STOUT"
# All uffd* targets the (possibly patched) selftests Makefile defines.
mapfile -t UFFD_TESTS < <(grep -hE '^[[:space:]]*TEST_GEN_(FILES|PROGS)[[:space:]]*[+:]?=' "$MM/Makefile" \
    | sed -E 's/^[^=]*=//' | tr ' \t' '\n\n' | grep -E '^uffd[-_A-Za-z0-9]*$' | sort -u)
[ ${#UFFD_TESTS[@]} -gt 0 ] || die "no uffd* targets found in $MM/Makefile"
log "building selftests: ${UFFD_TESTS[*]}"
STMAKE=(make -C "$MM" -j"$JOBS" OUTPUT="$STOUT" CC="ccache gcc"
        KHDR_INCLUDES="-isystem $OBJ/usr/include")
for t in "${UFFD_TESTS[@]}"; do
    if "${STMAKE[@]}" "$STOUT/$t" >>"$BLOG" 2>&1; then
        continue
    fi
    log "selftest $t failed to build; retrying with -luring"
    "${STMAKE[@]}" LDLIBS="-lrt -lpthread -lm -luring" "$STOUT/$t" >>"$BLOG" 2>&1 \
        || { tail -n 30 "$BLOG" >&2; die "selftest $t does not build"; }
done

# --- 6. publish into the cache -------------------------------------------------
TMP_OUT=$KERNELS_DIR/.tmp-$KEY-$$
rm -rf "$TMP_OUT"
mkdir -p "$TMP_OUT/selftests"
cp "$OBJ/arch/x86/boot/bzImage" "$TMP_OUT/bzImage"
cp "$OBJ/.config" "$TMP_OUT/config"
cp "$OBJ/System.map" "$TMP_OUT/System.map"
for t in "${UFFD_TESTS[@]}"; do cp "$STOUT/$t" "$TMP_OUT/selftests/"; done
# Upstream uffd tests (known before the series) vs new ones the series adds.
printf '%s\n' "${UFFD_TESTS[@]}" >"$TMP_OUT/selftests/ALL"
printf '%s\n' "${UFFD_TESTS[@]}" | grep -vxE 'uffd-stress|uffd-unit-tests' >"$TMP_OUT/selftests/NEW" || true
# New uffd invocations the series adds to run_vmtests.sh (e.g. "./uffd-unit-tests
# -p 20000", "./uffd-iouring"): these are the series' own selftests (suite b).
uffd_runs() {
    sed -n 's/^CATEGORY="userfaultfd" run_test \(.*\)$/\1/p' "$1" \
        | sed 's/\${uffd_stress_bin}/.\/uffd-stress/g' | sed 's/[[:space:]]*$//'
}
comm -13 <(uffd_runs "$WORK/run_vmtests.sh.orig" | sort -u) \
         <(uffd_runs "$MM/run_vmtests.sh" | sort -u) \
    | grep -v '\$' >"$TMP_OUT/selftests/NEW_CMDS" || true
# New binaries that run_vmtests.sh does not run: run them without arguments.
while read -r t; do
    grep -qE "^\./$t( |\$)" "$TMP_OUT/selftests/NEW_CMDS" || echo "./$t" >>"$TMP_OUT/selftests/NEW_CMDS"
done <"$TMP_OUT/selftests/NEW"
cp "$MM/run_vmtests.sh" "$TMP_OUT/selftests/"
cp "$OBJ/usr/include/linux/userfaultfd.h" "$TMP_OUT/userfaultfd.h"
series_patches >"$TMP_OUT/series" || true
cat >"$TMP_OUT/info.txt" <<EOF
key=$KEY
flavour=$FLAVOUR
source=$KERNEL_SRC_PKG $(src_pkg_version)
patches=$(series_patches | wc -l)
config_fragment=$(basename "$CONFIG_FRAGMENT") ${EXTRA_CONFIG:-}
kernel_release=$(cat "$OBJ/include/config/kernel.release")
built=$(date -u '+%Y-%m-%dT%H:%M:%SZ')
kernel_build_seconds=$KBUILD_SECS
total_seconds=$(( $(date +%s) - T0 ))
ccache=$(ccache -s 2>/dev/null | grep -iE 'hits|misses' | tr -s ' ' | paste -sd';' - || true)
EOF
cp "$BLOG" "$TMP_OUT/build.log"
rm -rf "$OUT"
mv "$TMP_OUT" "$OUT"
link_latest
if [ "${KEEP_BUILD:-0}" != 1 ]; then
    # Deleting ~70k files takes minutes on a busy disk: rename, delete detached.
    TRASH=$BUILD_ROOT/.trash-$KEY-$$
    mv "$WORK" "$TRASH"
    nohup rm -rf "$TRASH" </dev/null >/dev/null 2>&1 &
else
    log "kept build tree $WORK"
fi
log "built $FLAVOUR kernel in $KBUILD_SECS s (total $(( $(date +%s) - T0 )) s): $OUT"
echo "$OUT"
