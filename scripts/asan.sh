#!/bin/bash
# Build the cffi extensions with AddressSanitizer into a temporary copy of the project and run
# the native-engine tests against it (libasan preloaded into the project's Python).
#
#   scripts/asan.sh                 # the engine tests (unit + kernel)
#   scripts/asan.sh tests/...       # other tests, same build
#
# Needs the project venv (scripts/bootstrap.sh) and gcc's libasan (build-essential).  Leak
# detection is off: CPython itself keeps memory until exit.  Exit status: pytest's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || { echo "asan.sh: run scripts/bootstrap.sh first" >&2; exit 2; }
LIBASAN="$(gcc -print-file-name=libasan.so)"
[ -e "$LIBASAN" ] || { echo "asan.sh: no libasan.so (apt-get install build-essential)" >&2; exit 2; }

TMP="$(mktemp -d /tmp/uffd-aio-asan.XXXXXX)"
trap '[ -n "${ASAN_KEEP:-}" ] || rm -rf "$TMP"' EXIT
# a copy of the package and the tests: pytest puts the copy's root first on sys.path, so
# `import uffd_aio` picks the instrumented extension, not the editable install
cp -r "$ROOT/uffd_aio" "$ROOT/tests" "$ROOT/pyproject.toml" "$TMP/"
find "$TMP/uffd_aio" -name '*.so' -delete
# both extensions, the product's (binding/_native) and the test helpers' (testing/_helpers: the
# scan threads and SIGBUS catching the tests run), built apart from the copy: distutils would
# read (and validate) the copy's pyproject.toml
for pkg in binding testing; do
    mkdir -p "$TMP/build/uffd_aio/$pkg"
    cp -r "$ROOT/uffd_aio/$pkg/_build.py" "$ROOT/uffd_aio/$pkg/csrc" "$TMP/build/uffd_aio/$pkg/"
done
cd "$TMP/build"
for pkg in binding testing; do
    echo "[asan] building uffd_aio/$pkg's extension with -fsanitize=address in $TMP" >&2
    UA_CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g -O1" UA_LDFLAGS="-fsanitize=address" \
        "$PY" -c 'import runpy, sys; runpy.run_path(sys.argv[1])["ffibuilder"].compile(tmpdir=".")' \
        "uffd_aio/$pkg/_build.py" >>"$TMP/build.log" 2>&1 || { cat "$TMP/build.log" >&2; exit 2; }
    cp uffd_aio/"$pkg"/*.so "$TMP/uffd_aio/$pkg/"
done
cd "$TMP"
for so in uffd_aio/binding/_native*.so uffd_aio/testing/_helpers*.so; do
    [ "$(nm -D "$so" | grep -c " U __asan_")" -gt 0 ] || { echo "[asan] $so not instrumented" >&2; exit 2; }
done

if [ $# -eq 0 ]; then
    set -- tests/unit/test_native_engine_pure.py tests/integration/test_native_engine.py \
        tests/integration/test_native_record.py
fi
echo "[asan] running: pytest $*" >&2
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allow_user_segv_handler=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
LD_PRELOAD="$LIBASAN" "$PY" -m pytest -p no:cacheprovider -q "$@"
