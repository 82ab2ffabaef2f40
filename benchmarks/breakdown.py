#!/usr/bin/env python3
"""Per-fault cost breakdown of the handoff path, measured in place.

    .venv/bin/python benchmarks/breakdown.py [--loop asyncio|uvloop] [--threads 1]
                                             [--pages 32768] [--cpu 0] [--rounds 3]

Runs the benchmark's Python handler (``uffd_aio.bench.serve``, sync handler so that the
handler's own time can be timed around the call) in this process with timing wrappers
around each stage, hands it a uffd from ``benchmarks/c/build/workload`` (pinned like
``uffd-aio bench --pin same``), and prints the time per fault of:

* ``ioctl``: UFFDIO_COPY as seen by the pager thread: the kernel copy, waking the
  faulting thread, which on the same CPU runs at once, touches the next page and faults
  again, and the io_uring task work that completes the pending read (all inside the call);
* ``read(2)``: the direct reads of the uffd after a resolved batch (Pager._read_on);
* ``submit``: io_uring_enter re-arming the read (completes inline when a message waits);
* ``reap``: the C reap call and the tuples it returns;
* ``decode``, ``arm`` (prep of the next read), ``handler`` (the bench's read-ahead
  handler), ``resolve (py)`` (IoctlExecutor.execute minus its ioctl), ``dispatch (py)``
  (Pager._dispatch minus handler and resolve: lookup, dedup, PageFault, checks, queue,
  merge/flush, stats, finish);
* ``ring+read (py)``: the rest of Ring._on_readable (drain loop, callbacks, Pager._on_read);
* ``loop+wait``: outside Ring._on_readable: the event loop and the selector (epoll_wait)
  when a wakeup is needed (gaps over 2 ms are idle time, not counted).

Each wrapper costs ~0.2-0.6 us (calibrated and subtracted, printed); every row is the
median over ``--rounds`` workload runs of (stage time / faults); the workload's own
p50 and mean per touch are printed for comparison (they include the wrappers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from uffd_aio import pager as pager_mod
from uffd_aio import resolve as resolve_mod
from uffd_aio.bench import serve, store
from uffd_aio.bench.common import loop_factory, pin, quiet_logging
from uffd_aio.binding import lowlevel as ll
from uffd_aio.ring import ring as ring_mod

pc = time.perf_counter_ns
ROOT = pathlib.Path(__file__).resolve().parent
ACC: dict[str, int] = defaultdict(int)
CALLS: dict[str, int] = defaultdict(int)
LAST = [0]  # end of the last Ring._on_readable; 0 = not counting (between workload runs)
IDLE_NS = 2_000_000  # a loop wait longer than this is idle time, not part of a fault


def wrap(owner: Any, name: str, key: str) -> None:
    orig = getattr(owner, name)

    def timed(*a: Any, **kw: Any) -> Any:
        t0 = pc()
        try:
            return orig(*a, **kw)
        finally:
            ACC[key] += pc() - t0
            CALLS[key] += 1

    setattr(owner, name, timed)


def calibrate() -> float:
    """ns a wrapper adds per call (measured on a no-op)."""
    class Probe:
        @staticmethod
        def f() -> None:
            return None

    wrap(Probe, "f", "_cal")
    n = 200_000
    t0 = pc()
    for _ in range(n):
        Probe.f()
    with_w = (pc() - t0) / n
    g: Callable[[], None] = lambda: None  # noqa: E731
    t0 = pc()
    for _ in range(n):
        g()
    return max(0.0, with_w - (pc() - t0) / n)


def install() -> None:
    # the order matters: inner stages are wrapped where the pager looks them up
    wrap(ll, "uffd_copy", "ioctl")
    wrap(pager_mod.os, "readv", "read(2)")
    wrap(ll.RingHandle, "submit", "submit")
    wrap(ll.RingHandle, "reap", "reap")
    wrap(pager_mod.ev_mod, "decode", "decode")
    wrap(pager_mod.Pager, "_arm", "arm")
    wrap(pager_mod.Pager, "_dispatch", "dispatch")
    wrap(resolve_mod.IoctlExecutor, "execute", "resolve")
    orig_on = ring_mod.Ring._on_readable
    last = LAST

    def on_readable(self: Any) -> None:
        t0 = pc()
        if last[0]:
            gap = t0 - last[0]
            if gap < IDLE_NS:
                ACC["outside"] += gap
            else:  # the workload verifying, exiting, the next one starting: not a fault's
                CALLS["idle_gaps"] += 1
        orig_on(self)
        t1 = pc()
        ACC["readable"] += t1 - t0
        CALLS["readable"] += 1
        last[0] = t1

    ring_mod.Ring._on_readable = on_readable  # type: ignore[method-assign]
    orig_attach = store.attach

    def attach(region: Any, st: Any, window: int, *, sync: bool = False) -> Any:
        h = orig_attach(region, st, window, sync=True)

        def timed(ev: Any) -> Any:
            t0 = pc()
            try:
                return h(ev)
            finally:
                ACC["handler"] += pc() - t0
                CALLS["handler"] += 1

        region.on_fault(timed)
        return timed

    serve.attach = attach  # type: ignore[attr-defined]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = ROOT
    tmp = tempfile.mkdtemp(prefix="uffd-breakdown-")
    sock = os.path.join(tmp, "s.sock")
    sargs = serve.build_parser().parse_args(["--socket", sock, "--store-bytes",
                                             str(args.pages * 4096), "--handler", "sync",
                                             "--readahead", str(args.readahead)])
    task = asyncio.ensure_future(serve.serve(sargs))
    while not os.path.exists(sock):  # noqa: ASYNC110, ASYNC240 (a tool, not the pager)
        await asyncio.sleep(0.005)
    results = []
    for _ in range(args.rounds):
        cmd = [str(root / "c" / "build" / "workload"), "--socket", sock, "--pages",
               str(args.pages), "--threads", str(args.threads), "--fault-cpu", str(args.cpu)]
        LAST[0] = 0  # the gap before the first fault of a run is not fault-path time
        acc0, calls0 = dict(ACC), dict(CALLS)
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        LAST[0] = 0
        wl = json.loads(out)
        wl["acc"] = {k: v - acc0.get(k, 0) for k, v in ACC.items()}
        wl["calls"] = {k: v - calls0.get(k, 0) for k, v in CALLS.items()}
        results.append(wl)
    os.kill(os.getpid(), 15)
    await task
    return {"workload": results}


def rows_of(acc: dict[str, int], calls: dict[str, int], over: float) -> dict[str, float]:
    """us per fault by stage for one run: nested stages and wrapper overhead removed."""
    faults = calls.get("handler", 0) or 1

    def t(key: str) -> float:
        return acc.get(key, 0) - calls.get(key, 0) * over

    nested_ring = ("submit", "reap", "decode", "arm", "dispatch", "read(2)")
    ns = {
        "ioctl": t("ioctl"),
        "read(2)": t("read(2)"),
        "submit": t("submit"),
        "reap": t("reap"),
        "decode": t("decode"),
        "arm": t("arm"),
        "handler": t("handler"),
        "resolve (py)": t("resolve") - acc.get("ioctl", 0) - calls.get("ioctl", 0) * over,
        "dispatch (py)": t("dispatch") - acc.get("handler", 0) - acc.get("resolve", 0)
        - (calls.get("handler", 0) + calls.get("resolve", 0)) * over,
        "ring+read (py)": t("readable") - sum(acc.get(k, 0) + calls.get(k, 0) * over
                                              for k in nested_ring),
        "loop+wait": float(acc.get("outside", 0)),
    }
    return {k: v / faults / 1e3 for k, v in ns.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loop", default="asyncio")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pages", type=int, default=32768)
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--readahead", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    pin(args.cpu)
    quiet_logging()
    over = calibrate()
    ACC.clear()
    CALLS.clear()
    install()
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as r:
        res = r.run(run(args))
    wl = res["workload"]
    per_round = [rows_of(w["acc"], w["calls"], over) for w in wl]
    rows = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
    total = sum(rows.values())
    faults = sum(w["calls"].get("handler", 0) for w in wl) or 1
    p50 = statistics.median(w["p50_us"] for w in wl)
    mean = statistics.median(w["mean_us"] for w in wl)
    out = {"loop": args.loop, "threads": args.threads, "readahead": args.readahead,
           "rounds": args.rounds, "faults": faults,
           "wakeups_per_fault": round(CALLS["readable"] / faults, 3),
           "reads_per_fault": round((CALLS["decode"]) / faults, 3),
           "wrapper_overhead_ns": round(over, 1),
           "per_fault_us": {k: round(v, 2) for k, v in rows.items()},
           "sum_us": round(total, 2), "workload_p50_us": p50, "workload_mean_us": mean,
           "workload_mib_per_s": [w["mib_per_s"] for w in wl]}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.loop}, T={args.threads}, ra {args.readahead}: median of {args.rounds} "
              f"runs, {faults} faults, {out['wakeups_per_fault']} loop wakeups and "
              f"{out['reads_per_fault']} reads per fault, wrapper overhead {over:.0f} ns/call "
              "(subtracted)")
        for k, v in rows.items():
            print(f"  {k:<16} {v:7.2f} us  {100 * v / total:5.1f}%")
        print(f"  {'sum':<16} {total:7.2f} us   (workload with the wrappers: mean {mean} us "
              f"per touch, p50 {p50} us; x T threads waiting at once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
