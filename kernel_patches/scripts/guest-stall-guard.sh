#!/bin/bash
# Runs INSIDE the guest: run a command, and if the file it writes to stops
# growing for STALL seconds, collect what is needed to understand the hang
# (every user task's state, wait channel, kernel stack and syscall; blocked
# tasks via SysRq-w in dmesg; native stacks with gdb), then kill the command.
#
# Usage: guest-stall-guard.sh <watched file> <stall seconds> <hard limit seconds> <dump dir> <command...>
#
# Exit status: the command's, or 90 if it stalled (dump in <dump dir>/hang-*),
# or 137 if it hit the hard limit while still making progress (dump there too).
#
# Why: a pager bug or a kernel bug can block every thread of the test process
# (a thread that holds the GIL waiting in the kernel), so pytest-timeout cannot
# report anything; the guard sees it from outside and keeps the evidence.
set -uo pipefail
[ $# -ge 5 ] || { sed -n '2,13p' "$0" >&2; exit 2; }
WATCH=$1 STALL=$2 HARD=$3 DUMP=$4
shift 4

dump() {  # <pid of the command>
    local top=$1 out
    mkdir -p "$DUMP"
    out=$DUMP/hang-$(date +%H%M%S)
    mkdir -p "$out"
    {
        echo "# uptime: $(cat /proc/uptime)   loadavg: $(cat /proc/loadavg)"
        ps -eLo pid,ppid,tid,stat,wchan:40,comm,args 2>/dev/null
    } >"$out/ps.txt" 2>&1
    local p t
    for p in /proc/[0-9]*; do
        [ -n "$(tr -d '\0' <"$p/cmdline" 2>/dev/null)" ] || continue  # kernel threads
        for t in "$p"/task/*; do
            echo "=== pid $(basename "$p") tid $(basename "$t") $(cat "$t/comm" 2>/dev/null)" \
                 "$(grep -E '^State' "$t/status" 2>/dev/null | tr -s '\t ' ' ')"
            echo "syscall: $(cat "$t/syscall" 2>/dev/null)   wchan: $(cat "$t/wchan" 2>/dev/null)"
            cat "$t/stack" 2>/dev/null
        done
    done >"$out/stacks.txt" 2>&1
    for p in $(pgrep -s "$(ps -o sid= -p "$top" | tr -d ' ')" 2>/dev/null); do
        ls -l "/proc/$p/fd" >"$out/fds-$p.txt" 2>&1
    done
    echo 1 >/proc/sys/kernel/sysrq 2>/dev/null
    echo w >/proc/sysrq-trigger 2>/dev/null
    dmesg >"$out/dmesg.txt" 2>&1
    if command -v gdb >/dev/null; then
        # Only the suite's own Python processes (by process name, not command line: the
        # guard's bash mentions python too), 20 s each: a thread in a killable kernel
        # wait can stall gdb's attach, and the dump must finish before the boot's limit.
        for p in $(pgrep -s "$(ps -o sid= -p "$top" | tr -d ' ')" '^python'); do
            # py-bt needs python3.X-gdb.py next to the interpreter (pyenv, -dbg packages)
            timeout 20 gdb -p "$p" -batch -iex "add-auto-load-safe-path /" \
                -ex "info threads" -ex "thread apply all bt" -ex "thread apply all py-bt" \
                >"$out/gdb-$p.txt" 2>&1
        done
    fi
    echo "$out"
}

setsid "$@" &
pid=$!
t0=$(date +%s)
last_size=-1
last_change=$t0
while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    now=$(date +%s)
    size=$(stat -c %s "$WATCH" 2>/dev/null || echo 0)
    if [ "$size" != "$last_size" ]; then
        last_size=$size
        last_change=$now
    fi
    if [ $(( now - last_change )) -ge "$STALL" ]; then
        echo
        echo "stall-guard: no output for ${STALL}s; collecting stacks..."
        where=$(dump "$pid")
        echo "stall-guard: HUNG - task states, kernel stacks, SysRq-w and gdb stacks in $where"
        grep -E "^=== .*State: D" "$where/stacks.txt" | head -20
        kill -KILL -- -"$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        exit 90
    fi
    if [ $(( now - t0 )) -ge "$HARD" ]; then
        echo "stall-guard: hard limit ${HARD}s reached; collecting stacks..."
        where=$(dump "$pid")
        echo "stall-guard: stopped at the hard limit - task states, kernel stacks and gdb stacks in $where"
        kill -KILL -- -"$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        exit 137
    fi
done
wait "$pid"
