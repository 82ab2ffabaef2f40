#!/bin/sh
# Snapshot restore, end to end: the Firecracker flow with uffd_aio as the page server.
#
#   examples/snapshot_restore/run.sh            (as root, after the README's set-up)
#
# 1. build the VMM stand-in (vmm.c) and write a 60 MiB memory snapshot with a
#    known pattern;
# 2. start `uffd-aio serve --backend file:SNAPSHOT` on a Unix socket;
# 3. restore one "VM" (64 MiB of guest memory in 2 regions, 4 vCPU threads: the last
#    4 MiB lie past the end of the snapshot and must read as zeros), then two VMs at
#    once from the same snapshot, then one that plays balloon (MADV_DONTNEED: a REMOVE
#    event for the server); every byte is checked against the snapshot file.
#
# Environment: UFFD_AIO (the command, default: the repo's .venv), READAHEAD (adaptive),
# MIB (64), THREADS (4), NOWAIT=1 (serve page-cache hits with preadv2(RWF_NOWAIT) before
# falling back to io_uring: file:SNAPSHOT?nowait).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
UFFD_AIO=${UFFD_AIO:-$repo/.venv/bin/uffd-aio}
READAHEAD=${READAHEAD:-adaptive}
MIB=${MIB:-64}
THREADS=${THREADS:-4}
NOWAIT=${NOWAIT:-0}

make -s -C "$here" vmm
work=$(mktemp -d /tmp/uffd-aio-snapshot.XXXXXX)
server=
cleanup() {
	[ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

snap=$work/mem.snap
sock=$work/uffd.sock
backend=file:$snap
[ "$NOWAIT" = 1 ] && backend="$backend?nowait"
"$here/vmm" make-snapshot "$snap" $((MIB - 4))

echo "== uffd-aio serve --socket $sock --backend $backend --readahead $READAHEAD"
"$UFFD_AIO" -v serve --socket "$sock" --backend "$backend" --readahead "$READAHEAD" \
	2>"$work/server.log" &
server=$!
i=0
until [ -S "$sock" ]; do
	i=$((i + 1))
	if [ $i -gt 100 ] || ! kill -0 "$server" 2>/dev/null; then
		echo "the server did not start:"; cat "$work/server.log"; exit 1
	fi
	sleep 0.1
done

restore() { "$here/vmm" restore --socket "$sock" --snapshot "$snap" --mib "$MIB" \
	--threads "$THREADS" "$@"; }

echo "== one VM"
restore
echo "== two VMs restored from the same snapshot at once"
restore & a=$!
restore & b=$!
wait $a && wait $b
echo "== balloon: the server refetches ballooned pages (uffd-aio serve --remove refetch)"
restore --balloon refetch

kill "$server"; wait "$server" || true; server=
echo "== server log (errors and per-client summaries)"
grep -E "error|client_released|server_closed" "$work/server.log" || true
echo "snapshot restore example: OK"
