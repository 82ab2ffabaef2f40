#!/usr/bin/env python3
"""MOVE vs COPY for pages a handler already holds in its own anonymous memory.

    .venv/bin/python benchmarks/move_vs_copy.py [--mib 256] [--window 16] [--rounds 3]

The handler's "decompression buffer" is a private anonymous mapping the size of
the region, written by native code before each run (not timed).  One native
thread reads the region sequentially; every fault resolves a window of
``--window`` pages with ``UFFDIO_COPY`` from the buffer (the page is copied,
the buffer keeps its copy) or ``UFFDIO_MOVE`` (the buffer's page tables are
moved, zero-copy).  Prints GB/s of the reader per mode, interleaved rounds,
and checks every byte.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import statistics

import uffd_aio
from uffd_aio import testing
from uffd_aio.binding import lowlevel as ll

PS = 4096


async def run(mode: str, mib: int, window: int) -> float:
    n = mib << 20
    # private anonymous (MOVE's requirement), page-aligned (COPY's fast case)
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    stage, keep = ll.buffer_address(buf, writable=True)
    try:
        testing.fill_sync(stage, n)
        async with uffd_aio.Pager() as pager:
            region = pager.map(n)
            w = window * PS

            @region.on_fault
            def on_fault(ev: uffd_aio.PageFault) -> object:
                start = ev.offset // w * w
                if mode == "move":
                    # a window moves as a whole: a fault inside it can only be a
                    # duplicate whose page is there (EEXIST: resolved, wakes)
                    return uffd_aio.Moved(stage + start, min(w, n - start))
                return memoryview(buf)[start:start + min(w, n - start)]

            r = await testing.scan(region.address, n, op="verify")
            assert r.mismatches == 0, r
            return n / r.wall_s / 1e9
    finally:
        del keep
        buf.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    res: dict[str, list[float]] = {"copy": [], "move": []}
    for _ in range(a.rounds):
        for mode in res:
            res[mode].append(await run(mode, a.mib, a.window))
    for mode, v in res.items():
        print(f"{mode:5s} window={a.window:3d} pages  {statistics.median(v):6.2f} GB/s "
              f"(rounds: {', '.join(f'{x:.2f}' for x in v)})")


if __name__ == "__main__":
    asyncio.run(main())
