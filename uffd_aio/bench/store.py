"""The benchmark's fault handler: pattern content and the C handler's read-ahead policy.

The content is the benchmarks' pattern (benchmarks/README.md, ``uffd_aio.testing``),
pre-computed once into a buffer (like the C handler's ``--snapshot-mib``, a
MAP_POPULATE'd snapshot file), so a fault costs a slice, not a generation.

Read-ahead mirrors ``benchmarks/c/handler.c``: a per-region bitmap of served
pages; a fault on an unserved page copies every run of unserved pages in
``[page, page + window)`` clipped to the region (the faulting page's run is
the handler's return value, later runs are explicit ``ev.copy`` calls); a
fault on a page the bitmap says is served copies just that page (EEXIST is the
usual answer, and the pager then wakes the thread).
"""

from __future__ import annotations

import mmap
from collections.abc import Awaitable, Callable
from typing import Any

from uffd_aio import testing
from uffd_aio.events import Remove
from uffd_aio.region import PageFault, Region


def _filled(size: int) -> mmap.mmap:
    """``size`` bytes of pattern in a page-aligned anonymous mapping.

    Page-aligned like the C handler's MAP_POPULATE'd snapshot: a bytearray's data
    starts 16 bytes into a page, and UFFDIO_COPY from such a source is measurably
    slower (every 4 KiB page spans two source pages): 0.75x of C at read-ahead 64
    for a bare Python loop, 0.9x page-aligned (benchmarks/README.md).
    """
    buf = mmap.mmap(-1, max(size, 1))
    testing.pattern_into(memoryview(buf)[:size], 0)
    return buf


class PatternStore:
    """``size`` bytes of pattern from store offset 0, filled once up front."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = _filled(size)
        self.view = memoryview(self.buf)[:size]

    def grow(self, size: int) -> None:
        if size > self.size:  # a new buffer: handlers of earlier clients hold views of the old
            self.buf = _filled(size)
            self.size = size
            self.view = memoryview(self.buf)[:size]


def attach(region: Region, store: PatternStore, window: int, *,
           sync: bool = False) -> Callable[[PageFault], Any]:
    """Install the read-ahead handler on ``region``; returns it.

    ``sync``: a plain ``def`` handler instead of ``async def`` (both go
    through the pager's eager path; the async one is the common API).
    """
    ps = region.page_size
    shift = ps.bit_length() - 1
    npages = region.length >> shift
    base = region.store_offset
    store.grow(base + region.length)
    view = store.view
    served = bytearray(npages)
    ones = b"\x01" * max(window, 1)

    def later_runs(start: int, end: int) -> list[tuple[int, int]]:
        """Unserved runs in [start, end), marked served."""
        runs = []
        i = start
        while i < end:
            i = served.find(0, i, end)
            if i < 0:
                break
            j = served.find(1, i, end)
            if j < 0:
                j = end
            served[i:j] = ones[: j - i]
            runs.append((i, j))
            i = j
        return runs

    def first_run(ev: PageFault, more: bool = True) -> tuple[Any, list[tuple[int, int]]]:
        i = ev.offset >> shift
        if served[i]:
            off = base + ev.offset
            return view[off : off + ps], []
        end = i + window
        if end > npages:
            end = npages
        j = served.find(1, i, end)
        rest: list[tuple[int, int]] = []
        if j < 0:
            j = end
        elif more:
            rest = later_runs(j, end)
        served[i:j] = ones[: j - i]
        off = base + ev.offset
        return view[off : off + ((j - i) << shift)], rest

    def on_remove(msg: Any) -> None:
        if isinstance(msg, Remove):
            lo = max(msg.start, region.address) - region.address
            hi = min(msg.end, region.end) - region.address
            if hi > lo:
                served[lo >> shift : hi >> shift] = bytes((hi - lo) >> shift)

    region.on_event(on_remove)

    if sync:
        def on_fault_sync(ev: PageFault) -> Any:
            return first_run(ev, False)[0]  # no explicit copies: only the first run

        region.on_fault(on_fault_sync)
        return on_fault_sync

    async def on_fault(ev: PageFault) -> Any:
        data, rest = first_run(ev)
        for i, j in rest:
            await ev.copy(view[base + (i << shift) : base + (j << shift)], offset=i << shift)
        return data

    handler: Callable[[PageFault], Awaitable[Any]] = on_fault
    region.on_fault(handler)
    return handler
