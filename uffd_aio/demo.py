"""``uffd-aio demo``: page a large region through an ``async def`` handler, then verify it.

The handler serves a deterministic pattern (the same formula the C
benchmarks use), so every byte the native worker threads read can be
checked.  The workers are native threads from :mod:`uffd_aio.testing`: a
Python thread touching the region while holding the GIL would deadlock the
pager (docs/gil.md).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from collections.abc import Callable, Coroutine

import attrs

import uffd_aio
from uffd_aio import testing

MiB = 1 << 20


@attrs.frozen
class DemoResult:
    loop: str
    size: int
    threads: int
    faults: int
    handler_calls: int
    resolved_bytes: int
    wall_s: float
    mismatches: int
    p50_us: float
    p99_us: float

    @property
    def mib_per_s(self) -> float:
        return self.size / MiB / self.wall_s if self.wall_s else 0.0

    @property
    def us_per_fault(self) -> float:
        """Wall time per fault: with several threads, the amortized cost."""
        return self.wall_s * 1e6 / self.faults if self.faults else 0.0


async def run_once(size: int, *, threads: int, readahead: int, order: testing.Order,
                   loop_name: str, show_progress: bool = True) -> DemoResult:
    """One demo pass on the running loop; returns what it measured."""
    async with uffd_aio.Pager() as pager:
        region = pager.map(size)
        ps = region.page_size
        window = readahead * ps

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> None:
            # Content is a pure function of the offset: a stand-in for a fetch from a
            # store.  With read-ahead, one copy maps a whole window of pages.
            start = ev.offset - ev.offset % window
            length = min(window, region.length - start)
            await ev.copy(testing.pattern_bytes(start, length), offset=start)


        progress = (testing.progress_printer(loop_name, page_size=ps, width=8)
                    if show_progress else None)
        res = await testing.scan(region.address, size, threads=threads, op="verify",
                                 order=order, progress=progress,
                                 progress_interval=0.1)
        if progress is not None:
            progress(res.pages, res.pages)
        st = pager.stats
    return DemoResult(loop=loop_name, size=size, threads=threads, faults=st.faults,
                      handler_calls=st.handler_calls, resolved_bytes=st.resolved_bytes,
                      wall_s=res.wall_s, mismatches=res.mismatches,
                      p50_us=st.latency.p50_us, p99_us=st.latency.p99_us)


def _run_on(loop_name: str,
            coro_fn: Callable[[], Coroutine[object, object, DemoResult]]) -> DemoResult:
    if loop_name == "uvloop":
        import uvloop
        result: DemoResult = uvloop.run(coro_fn())
        return result
    return asyncio.run(coro_fn())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=256, help="region size in MiB (256)")
    parser.add_argument("--threads", type=int, default=4, help="native worker threads (4)")
    parser.add_argument("--readahead", type=int, default=1,
                        help="pages copied per fault (1 = no read-ahead)")
    parser.add_argument("--order", choices=["seq", "random"], default="seq")
    parser.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=1,
                        help="passes per loop (medians are reported when > 1)")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.size <= 0 or args.threads <= 0 or args.readahead <= 0 or args.rounds <= 0:
        print("uffd-aio demo: --size, --threads, --readahead, --rounds must be positive",
              file=sys.stderr)
        return 2
    size = args.size * MiB
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    print(f"uffd_aio demo: {args.size} MiB served by an async handler "
          f"(read-ahead {args.readahead} page(s)), {args.threads} native threads, "
          f"{args.order} order, verifying every byte")
    results: dict[str, list[DemoResult]] = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name in loops:  # interleaved: machine noise hits both loops alike
            r = _run_on(name, functools.partial(
                run_once, size, threads=args.threads, readahead=args.readahead,
                order=args.order, loop_name=name, show_progress=not args.no_progress))
            results[name].append(r)
    ok = True
    print(f"\n  {'loop':8} {'faults':>8} {'MiB/s':>8} {'us/fault':>9} "
          f"{'handler p50':>12} {'p99':>8}  verified")
    for name, rs in results.items():
        rs = sorted(rs, key=lambda r: r.wall_s)
        r = rs[len(rs) // 2]
        good = all(x.mismatches == 0 for x in rs)
        ok &= good
        print(f"  {name:8} {r.faults:8d} {r.mib_per_s:8.1f} {r.us_per_fault:9.2f} "
              f"{r.p50_us:10.1f}us {r.p99_us:6.1f}us  "
              + ("yes, every byte" if good else f"NO: {r.mismatches} bad pages"))
    print("\n  us/fault = scan wall time / faults (amortized over the threads); handler "
          "p50/p99 = fault arrival to resolution, log2 buckets")
    return 0 if ok else 1
