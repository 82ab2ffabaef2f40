#!/usr/bin/env bash
# Build the C reference, start ref_handler on a temp socket and run `workload`
# (and `inproc`, the in-process variant) for 1/4/16 threads, seq/random
# order, read-ahead 1/16/64.  One JSON line per run on stdout; the handler's
# per-client statistics go to $TMP/handler-ra*.log.
#
#   benchmarks/c/smoke.sh                 # one repetition
#   REPS=5 PAGES=16384 benchmarks/c/smoke.sh | python3 benchmarks/c/summarize.py
#
# Env: REPS (1), PAGES (16384), THREADS ("1 4 16"), ORDERS ("seq random"),
#      READAHEAD ("1 16 64"), INPROC (1: also run inproc), TIMEOUT (60),
#      PIN (none: let the scheduler place threads; same: handler and faulting
#      threads on CPU 0; split: handler on CPU 0, faulting threads on CPU 1).
#      Each repetition starts with two `inproc --baseline` runs (no uffd).
#      On these 2-vCPU VMs placement dominates the 1-thread latency (README).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
make -s -C "$here" >&2
B=$here/build
REPS=${REPS:-1} PAGES=${PAGES:-16384} TIMEOUT=${TIMEOUT:-60} INPROC=${INPROC:-1}
PIN=${PIN:-none}
case $PIN in
none) hpin=() wpin=() ipin=() ;;
same) hpin=(--cpu 0) wpin=(--fault-cpu 0) ipin=(--handler-cpu 0 --fault-cpu 0) ;;
split) hpin=(--cpu 0) wpin=(--fault-cpu 1) ipin=(--handler-cpu 0 --fault-cpu 1) ;;
*) echo "PIN must be none, same or split" >&2; exit 64 ;;
esac
THREADS=${THREADS:-"1 4 16"} ORDERS=${ORDERS:-"seq random"} READAHEAD=${READAHEAD:-"1 16 64"}
tmp=$(mktemp -d /tmp/uffd-smoke.XXXXXX)
sock=$tmp/handler.sock
hpid=
cleanup() {
	if [ -n "$hpid" ]; then kill "$hpid" 2>/dev/null || true; wait "$hpid" 2>/dev/null || true; fi
	if [ -z "${KEEP_TMP:-}" ]; then rm -rf "$tmp"; fi
}
trap cleanup EXIT
fail=0
for rep in $(seq 1 "$REPS"); do
	# the kernel floor: plain anonymous first-touch faults, no uffd (read maps
	# the shared zero page; write allocates + zeroes, closer to UFFDIO_COPY)
	"$B/inproc" --baseline --pages "$PAGES" --label "base-read-$PIN" "${ipin[@]}" || fail=1
	"$B/inproc" --baseline --pages "$PAGES" --write --label "base-write-$PIN" "${ipin[@]}" || fail=1
	for ra in $READAHEAD; do
		"$B/ref_handler" "${hpin[@]}" --readahead "$ra" "$sock" 2>>"$tmp/handler-ra$ra.log" &
		hpid=$!
		for t in $THREADS; do
			for o in $ORDERS; do
				"$B/workload" --socket "$sock" --pages "$PAGES" --threads "$t" --order "$o" \
					--timeout "$TIMEOUT" --label "ra$ra-$PIN" "${wpin[@]}" || fail=1
				if [ "$INPROC" = 1 ]; then
					"$B/inproc" --pages "$PAGES" --threads "$t" --order "$o" --readahead "$ra" \
						--timeout "$TIMEOUT" --label "ra$ra-$PIN" "${ipin[@]}" || fail=1
				fi
			done
		done
		kill "$hpid"; wait "$hpid" 2>/dev/null || true; hpid=
		if grep -q '"error"' "$tmp/handler-ra$ra.log"; then
			echo "ref_handler reported an error:" >&2; grep '"error"' "$tmp/handler-ra$ra.log" >&2; fail=1
		fi
	done
done
if [ "$fail" != 0 ]; then echo "smoke: FAILED (see JSON above)" >&2; exit 1; fi
echo "smoke: ok ($REPS repetition(s))" >&2
