#!/usr/bin/env python3
"""Run a command under an outer time limit; when it expires, keep evidence of the hang.

Usage: run-bounded.py [--limit S] [--dump-dir DIR] [--no-gdb] [--grace S] -- COMMAND [ARG...]

Why: pytest-timeout's thread method fails a test blocked in the kernel, but its
timer thread needs the GIL: a thread that faults on pager memory while holding
the GIL (docs/gil.md) stops it too, and the run would hang until CI kills it
with nothing to show.  This wrapper sees the hang from outside.

``--limit`` defaults to $HOST_SUITE_TIMEOUT, else 2400 s.  When it expires, for
every process of the command's tree (its process group, and descendants that
left it; orphans are adopted: the wrapper is a child subreaper):

* DIR/ps.txt: pid, ppid, state, wait channel and command line of each;
* DIR/proc-PID.txt: per thread: name, state, wait channel, syscall and kernel
  stack (/proc/PID/task/TID/{stat,status,wchan,syscall,stack}; the stack needs root);
* DIR/gdb-PID.txt: gdb's native backtrace of every thread (when gdb exists;
  ``--no-gdb`` skips it);
* then SIGABRT to the processes that catch it (pytest's faulthandler: it prints
  every Python thread's stack to the run's stderr, GIL or not), ``--grace`` s
  (default 5) to do so, then SIGKILL to all of them.

It names DIR on stderr and exits with status 124.  Otherwise it exits with the
command's status (128+N for a death by signal N), after killing (and naming)
any process the command left behind.  SIGINT, SIGTERM and SIGHUP are passed on
to the command's process group.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

TIMED_OUT = 124  # timeout(1)'s status for "the limit expired"
PR_SET_CHILD_SUBREAPER = 36
ME = "run-bounded"
# wait channels of a thread stuck on a userfaultfd (named in the summary)
UFFD_WAITS = ("handle_userfault", "userfaultfd_unmap_complete",
              "userfaultfd_event_wait_completion")


def say(msg: str) -> None:
    print(f"{ME}: {msg}", file=sys.stderr, flush=True)


def read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"<{exc.strerror}>"


def stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on: index 0 state, 1 ppid, 2 pgrp, 19 starttime."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_tree(root: int, pgid: int) -> dict[int, list[str]]:
    """Processes in process group ``pgid`` or below ``root`` (not ``root`` itself)."""
    table: dict[int, list[str]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := stat_fields(name)) is not None:
            table[int(name)] = st
    found = {pid for pid, st in table.items() if int(st[2]) == pgid}
    frontier = {root} | found
    while frontier:
        kids = {pid for pid, st in table.items() if int(st[1]) in frontier} - found
        kids.discard(root)
        found |= kids
        frontier = kids
    found.discard(root)
    return {pid: table[pid] for pid in sorted(found)}


def cmdline(pid: int) -> str:
    return read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()


def dump(tree: dict[int, list[str]], out: str, use_gdb: bool) -> list[str]:
    """Write the evidence; returns one line per thread waiting in a notable place."""
    notable: list[str] = []
    with open(os.path.join(out, "ps.txt"), "w") as ps:
        ps.write(f"# uptime {read('/proc/uptime').strip()}  "
                 f"loadavg {read('/proc/loadavg').strip()}\n")
        ps.write("pid ppid state wchan cmdline\n")
        for pid, st in tree.items():
            ps.write(f"{pid} {st[1]} {st[0]} {read(f'/proc/{pid}/wchan')} {cmdline(pid)}\n")
    for pid in tree:
        with open(os.path.join(out, f"proc-{pid}.txt"), "w") as f:
            f.write(f"pid {pid}: {cmdline(pid)}\n")
            try:
                tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
            except OSError:
                tids = []
            for tid in tids:
                t = f"/proc/{pid}/task/{tid}"
                state = next((ln.split(":", 1)[1].strip() for ln in read(f"{t}/status").splitlines()
                              if ln.startswith("State:")), "?")
                wchan = read(f"{t}/wchan").strip()
                comm = read(f"{t}/comm").strip()
                f.write(f"\n=== tid {tid} {comm!r} state {state} wchan {wchan}\n")
                f.write(f"syscall: {read(f'{t}/syscall').strip()}\n")
                f.write(read(f"{t}/stack"))
                if state.startswith("D") or wchan in UFFD_WAITS:
                    notable.append(f"pid {pid} tid {tid} {comm!r} {state} in {wchan}")
    gdb = shutil.which("gdb") if use_gdb else None
    if gdb:
        budget = time.monotonic() + 300
        for pid, st in tree.items():
            if st[0] == "Z" or time.monotonic() > budget:
                continue
            path = os.path.join(out, f"gdb-{pid}.txt")
            with open(path, "w") as f:
                try:
                    subprocess.run(
                        [gdb, "-p", str(pid), "-batch", "-nx", "-iex", "set auto-load safe-path /",
                         "-ex", "set pagination off", "-ex", "info threads",
                         "-ex", "thread apply all bt", "-ex", "thread apply all py-bt"],
                        stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, timeout=60,
                        check=False)
                except subprocess.TimeoutExpired:
                    f.write("\n<gdb did not finish in 60 s>\n")
    return notable


def catches(pid: int, sig: int) -> bool:
    for ln in read(f"/proc/{pid}/status").splitlines():
        if ln.startswith("SigCgt:"):
            return bool(int(ln.split()[1], 16) >> (sig - 1) & 1)
    return False


def kill_all(root: int, pgid: int, tree: dict[int, list[str]]) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    for pid, st in {**tree, **process_tree(root, pgid)}.items():
        now = stat_fields(pid)
        if now is not None and now[19] == st[19]:  # the same process, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def reap_adopted() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> int:
    ap = argparse.ArgumentParser(prog=ME, description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=float,
                    default=float(os.environ.get("HOST_SUITE_TIMEOUT", 2400)))
    ap.add_argument("--dump-dir", help="where to keep the evidence (default: a new dir in $TMPDIR)")
    ap.add_argument("--grace", type=float, default=5.0)
    ap.add_argument("--no-gdb", action="store_true")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("no command")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the command stay in reach

    proc = subprocess.Popen(cmd, process_group=0)
    pgid = proc.pid

    def forward(sig: int, _frame: object) -> None:
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)

    deadline = time.monotonic() + args.limit
    while True:
        try:
            rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                rc = None
                break

    me = os.getpid()
    if rc is not None:
        reap_adopted()
        left = {pid: st for pid, st in process_tree(me, pgid).items() if st[0] != "Z"}
        if left:
            say(f"the command left {len(left)} process(es) running; killing them: "
                + "; ".join(f"{pid} {cmdline(pid)[:120]}" for pid in left))
            kill_all(me, pgid, left)
        reap_adopted()
        return 128 - rc if rc < 0 else rc

    out = args.dump_dir or tempfile.mkdtemp(prefix="uffd-aio-hang-")
    os.makedirs(out, exist_ok=True)
    say(f"LIMIT EXPIRED: {shlex.join(cmd)!r} still running after {args.limit:g} s; "
        f"collecting stacks into {out} ...")
    tree = process_tree(me, pgid)
    notable = dump(tree, out, not args.no_gdb)
    aborted = [pid for pid in tree if catches(pid, signal.SIGABRT)]
    for pid in aborted:
        try:
            os.kill(pid, signal.SIGABRT)
        except OSError:
            pass
    end = time.monotonic() + args.grace
    while aborted and time.monotonic() < end and any(
            (st := stat_fields(pid)) is not None and st[0] != "Z" for pid in aborted):
        reap_adopted()
        time.sleep(0.1)
    kill_all(me, pgid, tree)
    proc.wait()
    reap_adopted()
    for line in notable[:20]:
        say(f"  {line}")
    gdb_note = ", gdb-PID.txt (native stacks)" if shutil.which("gdb") and not args.no_gdb else ""
    say(f"HUNG: killed {len(tree)} process(es) after {args.limit:g} s (exit {TIMED_OUT}). "
        f"Evidence in {out}: ps.txt, proc-PID.txt (thread states, wait channels, kernel "
        f"stacks){gdb_note}"
        + (f"; Python stacks (faulthandler, SIGABRT) of pid {', '.join(map(str, aborted))} "
           "are on stderr above" if aborted else ""))
    return TIMED_OUT


if __name__ == "__main__":
    sys.exit(main())
