#!/bin/bash
# Set up everything the demo and the tests need on Debian 12 (idempotent; fast when done):
# apt packages, the project venv (.venv) and the editable install, which builds the two
# cffi extensions (the product's against the system liburing, and the test helpers').
# Run as root (or with sudo available).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[bootstrap] %s\n' "$*" >&2; }

APT_PKGS=(build-essential pkg-config liburing-dev libffi-dev python3 python3-venv python3-dev
          redis-server)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt: installing ${missing[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The packaged redis-server unit may start a system instance; tests run their own.

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for c in python3.11 python3; do
        if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            PY="$c"; break
        fi
    done
fi
[ -n "$PY" ] || { log "need Python >= 3.11"; exit 1; }

stamp=".venv/.uffd-aio-installed"
# the inputs of both cffi extensions: the product's (binding) and the test helpers'
inputs=$(cat pyproject.toml setup.py uffd_aio/binding/_build.py uffd_aio/binding/csrc/* \
             uffd_aio/testing/_build.py uffd_aio/testing/csrc/* | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
    log "venv: creating .venv with $PY ($("$PY" --version))"
    "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ] || ! .venv/bin/python -c 'import uffd_aio.binding._native, uffd_aio.testing._helpers' 2>/dev/null; then
    # .[test] includes the extras the tests and the demo use (redis, zstd, metrics)
    log "pip: installing uffd-aio[test] (builds the cffi extensions against liburing)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test]"
    echo "$inputs" > "$stamp"
fi
log "ready: $(.venv/bin/python -c 'import uffd_aio; print("uffd_aio", uffd_aio.__version__)')"
