#!/bin/sh
# Working-set replay, end to end with the command-line tools (issue 14):
#
#   examples/snapshot_restore/workingset.sh        (as root, after the README's set-up)
#
# A "restore" (benchmarks/c/build/workload) touches a fixed random 30% of its 64 MiB,
# in a new random order each time, and checks every byte it touched.
# 1. three restores under `uffd-aio serve --record-set`, one recording each;
# 2. `uffd-aio workingset merge --min-runs 2`, `uffd-aio workingset show`;
# 3. a restore with no prefetch, one with `--replay SET`, one with `--replay SET --fill`:
#    the server log's `faults` per client are the demand faults left.
#
# Environment: UFFD_AIO (the command, default: the repo's .venv), MIB (64), SUBSET (300,
# permille of the pages touched), THREADS (2).  The measured comparison (five
# configurations, repeated, ratios): benchmarks/workingset.py.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
UFFD_AIO=${UFFD_AIO:-$repo/.venv/bin/uffd-aio}
PYTHON=${PYTHON:-$repo/.venv/bin/python}
MIB=${MIB:-64}
SUBSET=${SUBSET:-300}
THREADS=${THREADS:-2}

make -s -C "$repo/benchmarks/c" build/workload
make -s -C "$here" vmm
workload=$repo/benchmarks/c/build/workload
work=$(mktemp -d /tmp/uffd-aio-workingset.XXXXXX)
server=
cleanup() {
	[ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT INT TERM
snap=$work/mem.snap
sock=$work/uffd.sock
# the workload's pattern: vmm writes the same formula (benchmarks/c/pattern.h)
"$here/vmm" make-snapshot "$snap" "$MIB"

serve() {  # serve LOG ARGS...: start the server, wait for its socket
	log=$1; shift
	"$UFFD_AIO" -v --log-json serve --socket "$sock" --backend "file:$snap" "$@" 2>"$log" &
	server=$!
	i=0
	until [ -S "$sock" ]; do
		i=$((i + 1))
		if [ $i -gt 100 ] || ! kill -0 "$server" 2>/dev/null; then
			echo "the server did not start:"; cat "$log"; exit 1
		fi
		sleep 0.1
	done
}
stop() { kill "$server"; wait "$server" || true; server=; }
restore() {  # restore SEED: one client; prints its touch time and whether bytes matched
	"$workload" --socket "$sock" --pages $((MIB * 256)) --threads "$THREADS" --regions 1 \
		--order random --subset "$SUBSET" --set-seed 7 --seed "$1" --timeout 60 |
		sed -E 's/.*"faults_timed":([0-9]+).*"wall_s":([0-9.]+).*"verified":([a-z]+).*/  touched \1 pages in \2 s, verified: \3/'
}
report() {  # report LOG: the client's demand faults and the replay's numbers
	"$PYTHON" - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    e = json.loads(line)
    if e["event"] == "uffd_aio.workingset_installed":
        print(f"  replay: {e['pages_by_replay']} set pages, {e['pages_by_fill']} by the fill; "
              f"set installed in {e['set_installed_s']} s, fully resident in "
              f"{e['fully_resident_s']} s")
    if e["event"] == "uffd_aio.client_released":
        print(f"  demand faults: {e['faults']}")
PY
}

for i in 1 2 3; do
	echo "== recording $i (uffd-aio serve --record-set)"
	serve "$work/rec$i.log" --record-set "$work/run$i.ws"
	restore "$i"
	stop
done
echo "== uffd-aio workingset merge --min-runs 2"
"$UFFD_AIO" workingset merge "$work/run1.ws" "$work/run2.ws" "$work/run3.ws" --min-runs 2 \
	-o "$work/vm.ws"
"$UFFD_AIO" workingset show "$work/run1.ws" "$work/run2.ws"

for mode in none replay fill; do
	case $mode in
	none) echo "== no prefetch"; serve "$work/$mode.log" ;;
	replay) echo "== --replay vm.ws"; serve "$work/$mode.log" --replay "$work/vm.ws" ;;
	fill) echo "== --replay vm.ws --fill"; serve "$work/$mode.log" --replay "$work/vm.ws" --fill ;;
	esac
	restore 100
	stop
	report "$work/$mode.log"
done
echo "working-set example: OK"
