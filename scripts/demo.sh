#!/bin/bash
# The main demo: set up (bootstrap.sh), then page a 256 MiB region through an asyncio
# handler while native threads read it, on asyncio and on uvloop.  Extra arguments go
# to `uffd-aio demo` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/bootstrap.sh
exec .venv/bin/uffd-aio demo "$@"
