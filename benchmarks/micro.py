#!/usr/bin/env python3
"""Micro-benchmarks of uffd_aio's pure fault-path pieces (not part of the test suite).

    .venv/bin/python benchmarks/micro.py [--loop asyncio|uvloop] [--repeat 7] [--json]
    .venv/bin/python benchmarks/micro.py --compare benchmarks/micro-baseline.json  # regressions

``--save FILE`` writes a baseline; ``--compare FILE`` prints each line's ratio to it and
exits 1 when one is slower by more than ``--tolerance`` (15%).  Baselines are per machine:
``benchmarks/micro-baseline.json`` was taken on the project's 2-vCPU machine (see the README).

Each line: the best of ``--repeat`` batches, per-call cost in microseconds of this thread's
CPU time (syscalls included, preemption by other processes not).

* ``decode 64``: ``events.decode`` of a 2 KiB buffer of 64 PAGEFAULT messages.
* ``decode 1``: one message (the T=1 case: one message per read).
* ``dispatch 1 fault``: ``Pager._dispatch`` of one decoded fault on a real Pager (real uffd,
  ring, region, the benchmark's read-ahead handler returning one page), with the resolve
  backend replaced by a stub that returns at once: lookup, dedup, PageFault, the handler
  (async def, run eagerly), the result check, queueing, merge/flush, stats, finish.
* ``dispatch 1 fault (sync handler)``: the same with a plain ``def`` handler.
* ``read path 1 fault, no re-arm``: ``Pager._on_read`` for one message: decode + dispatch
  (stub backend), with the re-arm of the io_uring read stubbed out; since 4c99c8e it
  includes one direct read(2) of the uffd that finds nothing (``Pager._read_on``).
* ``reap+callback (nop)``: one NOP through the ring: prep, submit, reap, callback (with
  the ``io_uring_enter`` syscall).
* ``UFFDIO_COPY 1 page (EEXIST)``: the ioctl wrapper on a page that is present (syscall
  floor of a resolve; the real copy also allocates and copies 4 KiB).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from uffd_aio import events, testing
from uffd_aio.bench.common import loop_factory, quiet_logging
from uffd_aio.bench.store import PatternStore, attach
from uffd_aio.pager import Pager
from uffd_aio.resolve import Op

PAGE = 4096


def bench(fn: Callable[[], Any], n: int, repeat: int) -> float:
    """Best per-call microseconds over ``repeat`` batches of ``n`` calls.

    CPU time of this thread (not wall time) and the minimum (as timeit does):
    on a shared 2-vCPU machine other processes preempt us, and that is noise
    here, not cost.
    """
    times = []
    for _ in range(repeat):
        t0 = time.thread_time_ns()
        for _ in range(n):
            fn()
        times.append((time.thread_time_ns() - t0) / n / 1e3)
    return min(times)


def quiet_pager(name: str) -> Pager:
    """A Pager without the stall watchdog (older trees have no such option)."""
    if "stall_warning" in inspect.signature(Pager).parameters:
        return Pager(name=name, stall_warning=None)
    return Pager(name=name)


class StubExecutor:
    name = "stub"
    ioctls = 0

    def execute(self, uffd: Any, op: Op) -> int:
        return op.length


async def run(args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    n, rep = args.n, args.repeat
    buf64 = b"".join(events.encode_pagefault(0x7F0000000000 + i * PAGE) for i in range(64))
    buf1 = buf64[: events.MSG_SIZE]
    out["decode 64 msgs"] = bench(lambda: events.decode(buf64), n // 16, rep)
    out["decode 1 msg"] = bench(lambda: events.decode(buf1), n, rep)

    pages = 4096
    store = PatternStore(pages * PAGE)
    for sync in (False, True):
        async with quiet_pager("micro") as pager:
            region = pager.map(pages * PAGE)
            attach(region, store, 1, sync=sync)
            pager._resolver.backend = StubExecutor()  # type: ignore[assignment]
            ctx = pager._main
            assert ctx is not None
            msgs = [events.PageFaultMsg(region.address + (i % pages) * PAGE, 0, 0)
                    for i in range(n)]
            it = iter(range(10**12))

            def one(ctx: Any = ctx, msgs: list[Any] = msgs, it: Any = it) -> None:
                pager._dispatch(ctx, [msgs[next(it) % n]])

            key = "dispatch 1 fault" + (" (sync handler)" if sync else "")
            out[key] = bench(one, n, rep)
            if not sync:
                # the read path: decode + re-arm + dispatch (the SQE is prepped, then
                # cancelled by the pager's close; nothing is submitted per call)
                ring = pager.ring
                ring.flush()
                data = bytearray(ctx.buf)
                data[: events.MSG_SIZE] = events.encode_pagefault(region.address)
                saved = ctx.buf
                ctx.buf = data
                arm = pager._arm
                pager._arm = lambda c: None  # type: ignore[method-assign]

                def read_path(ctx: Any = ctx) -> None:
                    pager._on_read(ctx, events.MSG_SIZE, 0)

                out["read path 1 fault, no re-arm"] = bench(read_path, n, rep)
                ctx.buf = saved
                pager._arm = arm  # type: ignore[method-assign]
                ctx.reading = True

    ring_loop = asyncio.get_running_loop()
    from uffd_aio.ring import Ring

    ring = Ring(loop=ring_loop)
    try:
        async def nops() -> None:
            for _ in range(n // 4):
                await ring.nop()

        t = []
        for _ in range(rep):
            t0 = time.thread_time_ns()
            await nops()
            t.append((time.thread_time_ns() - t0) / (n // 4) / 1e3)
        out["ring nop round trip (await)"] = min(t)
    finally:
        ring.close()

    async with quiet_pager("micro-copy") as pager:
        region = pager.map(PAGE)
        region.on_fault(lambda ev: testing.pattern_bytes(0, PAGE))
        await testing.verify(region.address, PAGE)
        uffd = pager.uffd
        src = bytearray(PAGE)
        from uffd_aio.binding import lowlevel as ll

        addr, keep = ll.buffer_address(src)
        out["UFFDIO_COPY 1 page (EEXIST)"] = bench(
            lambda: uffd.copy_fast(region.address, addr, PAGE), n, rep)
        del keep
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loop", default="asyncio")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("-n", type=int, default=4000, help="calls per batch")
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", metavar="FILE", help="write the results as a baseline")
    p.add_argument("--compare", metavar="FILE",
                   help="compare with a baseline; exit 1 if a line is slower by > --tolerance")
    p.add_argument("--tolerance", type=float, default=0.15, help="fraction (0.15 = 15%%)")
    args = p.parse_args()
    quiet_logging()
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as r:
        out = r.run(run(args))
    rounded = {k: round(v, 3) for k, v in out.items()}
    if args.save:
        with open(args.save, "w") as f:
            json.dump(rounded, f, indent=1)
    if args.json:
        print(json.dumps(rounded))
        return 0
    base: dict[str, float] = {}
    if args.compare:
        with open(args.compare) as f:
            base = json.load(f)
    worse = 0
    for k, v in out.items():
        line = f"{k:<44} {v:8.3f} us"
        if base.get(k):
            ratio = v / base[k]
            slow = ratio > 1 + args.tolerance
            worse += slow
            line += f"   baseline {base[k]:8.3f}  {ratio:5.2f}x" + ("  SLOWER" if slow else "")
        print(line)
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
