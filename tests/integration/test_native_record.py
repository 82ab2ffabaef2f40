"""The native engine's first-touch log (``region.serve_from(record=...)``) against the
real kernel: what it reports, in order, for plain faults, read-ahead windows, writes,
page-cache misses (io_uring READs) and fork children.

Memory is touched only from native threads (uffd_aio.testing) or child processes.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from pathlib import Path
from typing import Any

import pytest

from uffd_aio.binding import lowlevel as ll
from uffd_aio.pager import Pager

from .helpers import PS, child, pattern_mmap, require_evicted, scan, write_snapshot

pytestmark = pytest.mark.timeout(120)

NPAGES = 96
LENGTH = NPAGES * PS


class Log:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bool]] = []

    def __call__(self, page: int, pages: int, write: bool) -> None:
        self.calls.append((page, pages, write))

    def first_touches(self) -> list[int]:
        seen: dict[int, None] = {}
        for page, _, _ in self.calls:
            seen.setdefault(page)
        return list(seen)

    def covered(self) -> list[int]:
        """The pages placed, in the order a FaultRecorder would record them."""
        seen: dict[int, None] = {}
        for page, pages, _ in self.calls:
            for p in range(page, page + pages):
                seen.setdefault(p)
        return list(seen)


def _engine_stats(pager: Pager) -> Any:
    return pager._main.engine.stats()  # type: ignore[union-attr]


async def test_every_fault_in_order_one_page_windows() -> None:
    log = Log()
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(pattern_mmap(LENGTH), record=log)
        assert (await scan(region.address, LENGTH, op="verify")).mismatches == 0
        st = pager.stats
        assert st.python_faults == 0 and st.native_faults == NPAGES and st.errors == 0
        assert log.calls == [(i, 1, False) for i in range(NPAGES)]
        assert _engine_stats(pager).touches == NPAGES


async def test_random_order_and_writes() -> None:
    log = Log()
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(pattern_mmap(LENGTH), record=log)
        res = await scan(region.address, LENGTH, op="write", order="random", rng_seed=7)
        assert res.mismatches == 0
        assert pager.stats.python_faults == 0
        assert sorted(log.first_touches()) == list(range(NPAGES))
        assert log.first_touches() != list(range(NPAGES))  # the scan's random order
        assert all(write and pages == 1 for _, pages, write in log.calls)


async def test_readahead_window_reported() -> None:
    log = Log()
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(pattern_mmap(LENGTH), readahead=8, record=log)
        assert (await scan(region.address, LENGTH, op="verify")).mismatches == 0
        assert pager.stats.python_faults == 0
        assert log.calls == [(i, 8, False) for i in range(0, NPAGES, 8)]
        assert log.covered() == list(range(NPAGES))


async def test_duplicates_from_threads_are_reported_as_touches() -> None:
    """Several threads on the same pages: every page placed once; the others' faults
    (EEXIST wakes) come as 0-page touches."""
    log = Log()
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(pattern_mmap(LENGTH), record=log)
        assert (await scan(region.address, LENGTH, threads=4, op="verify")).mismatches == 0
        assert pager.stats.python_faults == 0
        placed = [p for p, n, _ in log.calls if n]
        assert sorted(placed) == list(range(NPAGES))
        assert sorted(log.first_touches()) == list(range(NPAGES))


async def test_not_recording_logs_nothing() -> None:
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(pattern_mmap(LENGTH))
        assert (await scan(region.address, LENGTH, op="verify")).mismatches == 0
        assert _engine_stats(pager).touches == 0


async def test_page_cache_misses_read_by_the_engine(tmp_path: Path) -> None:
    snap = write_snapshot(tmp_path / "mem.snap", LENGTH, evict=True)
    require_evicted(snap)
    log = Log()
    async with Pager(handler_timeout=20) as pager:
        region = pager.map(LENGTH)
        region.serve_from(snap, readahead=(1, 8), record=log)
        assert (await scan(region.address, LENGTH, op="verify")).mismatches == 0
        st = pager.stats
        assert st.python_faults == 0 and st.native_cache_reads > 0
        assert log.covered() == list(range(NPAGES))
        assert log.first_touches()[0] == 0


async def test_fork_child_touches_in_region_pages() -> None:
    """A child's faults on a piece that starts 8 pages into the region (the parent
    unmapped the first 8 before the fork) are reported with the region's page index."""
    log = Log()
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(pattern_mmap(LENGTH), record=log)
        await asyncio.to_thread(ll.munmap, region.address, 8 * PS)  # UNMAP event
        await asyncio.sleep(0.05)
        status = await child(region.address + 8 * PS, LENGTH - 8 * PS, op="verify",
                             offset=8 * PS, timeout=60)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        st = pager.stats
        assert st.forks == 1 and st.python_faults == 0 and st.errors == 0
        assert log.calls == [(i, 1, False) for i in range(8, NPAGES)]


async def test_replacing_the_source_stops_recording() -> None:
    log = Log()
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(pattern_mmap(LENGTH), record=log)
        assert (await scan(region.address, LENGTH // 2, op="verify")).mismatches == 0
        region.serve_from(pattern_mmap(LENGTH))  # no record: the rest is not reported
        assert (await scan(region.address, LENGTH, op="verify")).mismatches == 0
        assert log.calls == [(i, 1, False) for i in range(NPAGES // 2)]
        assert pager.stats.python_faults == 0


async def test_full_log_passes_faults_up() -> None:
    """Faults fed to the engine directly (no drain between batches, no thread waits on
    them): once the log holds LOG_CAP entries the recording region's faults are passed
    up to Python, none lost; after a drain the engine takes them again."""
    import struct

    from uffd_aio.binding.engine import LOG_CAP

    n = LOG_CAP + 8
    src = mmap.mmap(-1, n * PS)
    log = Log()
    async with Pager() as pager:
        region = pager.map(n * PS)
        region.serve_from(src, record=log)
        engine = pager._main.engine  # type: ignore[union-attr]
        left_total = 0
        for first in range(0, n, 64):
            msgs = bytearray(b"".join(
                struct.pack("<BBHIQQQ", 0x12, 0, 0, 0, 1 if p % 2 else 0,
                            region.address + p * PS, 0)
                for p in range(first, min(first + 64, n))))
            addr, keep = ll.buffer_address(msgs, writable=True)
            left_total += engine.run(addr, len(msgs), len(msgs))
            del keep
        assert left_total == 8
        st = engine.stats()
        assert st.touches == LOG_CAP and st.touch_full == 8
        touches = engine.touches()
        assert [(t.page, t.pages, t.write) for t in touches] == \
            [(p, 1, bool(p % 2)) for p in range(LOG_CAP)]
        msgs = bytearray(struct.pack("<BBHIQQQ", 0x12, 0, 0, 0, 0,
                                     region.address + LOG_CAP * PS, 0))
        addr, keep = ll.buffer_address(msgs, writable=True)
        assert engine.run(addr, len(msgs), len(msgs)) == 0  # room again: served in C
        del keep
        assert [(t.page, t.pages) for t in engine.touches()] == [(LOG_CAP, 1)]
