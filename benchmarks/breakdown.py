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
* ``submit``: io_uring_enter re-arming the read (completes inline when a message waits);
* ``reap``: the C reap call and the tuples it returns;
* ``decode``, ``arm`` (prep of the next read), ``handler`` (the bench's read-ahead
  handler), ``resolve (py)`` (IoctlBackend.execute minus its ioctl), ``dispatch (py)``
  (Pager._dispatch minus handler and resolve: lookup, dedup, PageFault, checks, queue,
  merge/flush, stats, finish);
* ``ring+read (py)``: the rest of Ring._on_readable (drain loop, callbacks, Pager._on_read);
* ``loop+wait``: outside Ring._on_readable: the event loop and the selector (epoll_wait)
  when a wakeup is needed.

Each wrapper costs ~0.2-0.3 us (calibrated and subtracted, ``overhead`` printed); the
workload's own p50 is printed for comparison (it includes the wrappers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
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
from uffd_aio.ring import _lowlevel as ll
from uffd_aio.ring import ring as ring_mod

pc = time.perf_counter_ns
ACC: dict[str, int] = defaultdict(int)
CALLS: dict[str, int] = defaultdict(int)


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
    class O:
        @staticmethod
        def f() -> None:
            return None

    wrap(O, "f", "_cal")
    n = 200_000
    t0 = pc()
    for _ in range(n):
        O.f()
    with_w = (pc() - t0) / n
    g: Callable[[], None] = lambda: None  # noqa: E731
    t0 = pc()
    for _ in range(n):
        g()
    return max(0.0, with_w - (pc() - t0) / n)


def install() -> None:
    # the order matters: inner stages are wrapped where the pager looks them up
    wrap(ll, "uffd_copy", "ioctl")
    wrap(ll.RingHandle, "submit", "submit")
    wrap(ll.RingHandle, "reap", "reap")
    wrap(pager_mod.ev_mod, "decode", "decode")
    wrap(pager_mod.Pager, "_arm", "arm")
    wrap(pager_mod.Pager, "_dispatch", "dispatch")
    wrap(resolve_mod.IoctlBackend, "execute", "resolve")
    orig_on = ring_mod.Ring._on_readable
    last = [0]

    def on_readable(self: Any) -> None:
        t0 = pc()
        if last[0]:
            ACC["outside"] += t0 - last[0]
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
    root = pathlib.Path(__file__).resolve().parent
    tmp = tempfile.mkdtemp(prefix="uffd-breakdown-")
    sock = os.path.join(tmp, "s.sock")
    sargs = serve.build_parser().parse_args(["--socket", sock, "--store-bytes",
                                             str(args.pages * 4096), "--handler", "sync"])
    task = asyncio.ensure_future(serve.serve(sargs))
    while not os.path.exists(sock):
        await asyncio.sleep(0.005)
    results = []
    for _ in range(args.rounds):
        cmd = [str(root / "c" / "build" / "workload"), "--socket", sock, "--pages",
               str(args.pages), "--threads", str(args.threads), "--fault-cpu", str(args.cpu)]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        results.append(json.loads(out))
    os.kill(os.getpid(), 15)
    await task
    return {"workload": results}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loop", default="asyncio")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pages", type=int, default=32768)
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
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
    faults = CALLS["handler"] or 1

    def per(key: str, minus: tuple[str, ...] = ()) -> float:
        """us per fault of ``key`` minus nested stages, wrapper overhead removed."""
        v = ACC[key] - CALLS[key] * over
        for m in minus:
            v -= ACC[m]
        return v / faults / 1e3

    nested_ring = ("submit", "reap", "decode", "arm", "dispatch")
    rows = {
        "ioctl": per("ioctl"),
        "submit": per("submit"),
        "reap": per("reap"),
        "decode": per("decode"),
        "arm": per("arm"),
        "handler": per("handler"),
        "resolve (py)": per("resolve", ("ioctl",)) - CALLS["ioctl"] * over / faults / 1e3,
        "dispatch (py)": per("dispatch", ("handler", "resolve"))
        - (CALLS["handler"] + CALLS["resolve"]) * over / faults / 1e3,
        "ring+read (py)": per("readable", nested_ring)
        - sum(CALLS[k] for k in nested_ring) * over / faults / 1e3,
        "loop+wait": ACC["outside"] / faults / 1e3,
    }
    total = sum(rows.values())
    wl = res["workload"]
    p50 = sorted(w["p50_us"] for w in wl)[len(wl) // 2]
    out = {"loop": args.loop, "threads": args.threads, "faults": faults,
           "wakeups_per_fault": round(CALLS["readable"] / faults, 3),
           "reads_per_fault": round(CALLS["decode"] / faults, 3),
           "wrapper_overhead_ns": round(over, 1),
           "per_fault_us": {k: round(v, 2) for k, v in rows.items()},
           "sum_us": round(total, 2), "workload_p50_us": p50,
           "workload_mib_per_s": [w["mib_per_s"] for w in wl]}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.loop}, T={args.threads}, {faults} faults, {out['wakeups_per_fault']} "
              f"loop wakeups and {out['reads_per_fault']} reads per fault, wrapper overhead "
              f"{over:.0f} ns/call (subtracted)")
        for k, v in rows.items():
            print(f"  {k:<16} {v:7.2f} us  {100 * v / total:5.1f}%")
        print(f"  {'sum':<16} {total:7.2f} us   (workload p50 {p50} us, with the wrappers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
