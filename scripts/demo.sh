#!/bin/bash
# The main demo: set up (bootstrap.sh), then remote memory in Redis: a private
# redis-server holds 256 MiB of pages; a region faults them in through an asyncio
# handler while native threads read and verify every byte, with read-ahead off and
# adaptive.  Extra arguments go to examples/remote_memory/remote_memory.py (--help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/bootstrap.sh
exec .venv/bin/python examples/remote_memory/remote_memory.py "$@"
