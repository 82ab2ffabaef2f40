"""The native fault engine (region.serve_from) against the real kernel.

Memory is touched only from native threads (uffd_aio.testing) or child
processes; every byte is verified with the shared pattern.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

import uffd_aio
from tests.limits import limit
from uffd_aio import testing
from uffd_aio.binding import lowlevel as ll
from uffd_aio.modes import Mode
from uffd_aio.pager import Pager
from uffd_aio.serving.readahead import AdaptiveWindow, FixedWindow

from .helpers import PS, child, pattern_mmap, require_evicted, scan, write_snapshot

NPAGES = 192
LENGTH = NPAGES * PS


def _engine(pager: Pager) -> Any:
    return pager._main.engine  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "mmap"])
@pytest.mark.parametrize("readahead", [None, 8, (1, 32)])
async def test_memory_source_every_byte(kind: str, readahead: Any) -> None:
    data = testing.pattern_bytes(0, LENGTH)
    source: Any = {"bytes": bytes(data), "bytearray": data,
                   "mmap": pattern_mmap(LENGTH)}[kind]
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(source, readahead=readahead)
        res = await scan(region.address, LENGTH, threads=1, op="verify")
        assert res.mismatches == 0
        st = pager.stats
        assert st.native_faults >= 1 and st.python_faults == 0 and st.handler_calls == 0
        assert st.native_pages == NPAGES and st.errors == 0
        if readahead is None:
            assert st.native_faults == NPAGES and st.native_readahead_pages == 0
        else:
            assert st.native_faults < NPAGES and st.native_readahead_pages > 0


@pytest.mark.parametrize("order", ["seq", "random"])
@pytest.mark.parametrize("readahead", [None, 4, AdaptiveWindow(1, 16)])
async def test_memory_source_threads(order: str, readahead: Any) -> None:
    src = pattern_mmap(LENGTH)
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(src, readahead=readahead)
        res = await scan(region.address, LENGTH, threads=4, op="verify", order=order)
        assert res.mismatches == 0
        # and once more from a fresh reader: everything present, nothing faults
        assert await testing.verify(region.address, LENGTH) == -1
        st = pager.stats
        assert st.native_pages == NPAGES and st.python_faults == 0 and st.errors == 0


async def test_memory_source_offset_and_fixed_policy() -> None:
    off = 5 * PS + 8  # a buffer offset need not be page-aligned
    src = bytearray(8) + testing.pattern_bytes(0, LENGTH + 5 * PS)
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(src, offset=off, readahead=FixedWindow(16))
        res = await scan(region.address, LENGTH, threads=2, op="verify", offset=5 * PS)
        assert res.mismatches == 0


async def test_zero_source() -> None:
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(uffd_aio.ZERO, readahead=(2, 8))
        res = await scan(region.address, LENGTH, threads=3, op="read", order="random")
        assert res.mismatches == 0
        assert await testing.read(region.address, LENGTH) == bytes(LENGTH)
        st = pager.stats
        assert st.native_pages == NPAGES and st.copies == 0 and st.python_faults == 0


async def test_dedup_many_threads_one_page() -> None:
    """Several threads fault on the same pages: one copy each, the rest woken."""
    src = pattern_mmap(4 * PS)
    async with Pager() as pager:
        region = pager.map(4 * PS)
        region.serve_from(src)
        results = await asyncio.gather(*(scan(region.address, 4 * PS, threads=4, op="verify")
                                         for _ in range(4)))
        assert all(r.mismatches == 0 for r in results)
        st = pager.stats
        assert st.native_pages == 4 and st.errors == 0 and st.python_faults == 0


async def test_remove_while_serving_then_refault() -> None:
    """madvise(DONTNEED) from a worker thread while threads fault: the REMOVE event
    clears the resident bits, and the pages are served again with the right content."""
    src = pattern_mmap(LENGTH)
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(src, readahead=(1, 16))
        assert (await scan(region.address, LENGTH, op="verify")).mismatches == 0
        engine = _engine(pager)
        (rid,) = pager._native[region][1]
        assert engine.resident(rid, 0)

        async def dropper() -> None:
            for i in range(8):
                start = region.address + (i * 17 % (NPAGES - 8)) * PS
                await asyncio.to_thread(ll.madvise, start, 8 * PS, ll.MADV_DONTNEED)

        results = await asyncio.gather(
            scan(region.address, LENGTH, threads=2, op="verify", order="random"), dropper())
        assert results[0].mismatches == 0
        await asyncio.to_thread(ll.madvise, region.address, LENGTH, ll.MADV_DONTNEED)
        assert (await scan(region.address, LENGTH, threads=2, op="verify")).mismatches == 0
        st = pager.stats
        assert st.removes >= 9
        assert st.native_pages >= 2 * NPAGES  # everything served twice at least
        assert st.errors == 0


async def test_unregister_while_serving() -> None:
    """The engine drops the range at unregister: later faults are plain memory."""
    addr = ll.mmap(LENGTH)
    try:
        async with Pager() as pager:
            region = pager.register(addr, LENGTH)
            region.serve_from(pattern_mmap(LENGTH))
            done: list[int] = []
            fut = asyncio.ensure_future(scan(addr, LENGTH, op="read", order="random",
                                             progress=lambda d, t: done.append(d),
                                             progress_interval=0.001))
            while not done or done[-1] < 16:
                await asyncio.sleep(0.001)
                if fut.done():
                    break
            await pager.unregister(region)
            assert _engine(pager).ranges() == 0
            assert (await fut).mismatches == 0
            assert pager._native == {}
    finally:
        ll.munmap(addr, LENGTH)


async def test_remap_and_unmap_follow() -> None:
    """mremap moves the range in the engine (content keeps coming from the source,
    page offsets preserved); munmap of a part cuts it."""
    addr = ll.mmap(LENGTH)
    target = ll.mmap(LENGTH)  # a place to move to
    ours = [(target, LENGTH)]  # what to unmap at the end: never the hole (reused since)
    try:
        async with Pager() as pager:
            region = pager.register(addr, LENGTH)
            region.serve_from(pattern_mmap(LENGTH))
            half = LENGTH // 2
            assert (await scan(addr, half, op="verify")).mismatches == 0
            new = await asyncio.to_thread(ll.mremap, addr, LENGTH, LENGTH,
                                          ll.MREMAP_MAYMOVE | ll.MREMAP_FIXED, target)
            assert new == target
            addr = -1
            assert (await scan(new, LENGTH, op="verify")).mismatches == 0
            assert pager.stats.remaps == 1 and pager.stats.python_faults == 0
            await asyncio.to_thread(ll.munmap, new + PS, PS)  # cut a hole: UNMAP
            ours = [(new, PS), (new + 2 * PS, LENGTH - 2 * PS)]
            assert _engine(pager).ranges() == 2
            await pager.unregister(region)
            assert _engine(pager).ranges() == 0
    finally:
        if addr != -1:
            ll.munmap(addr, LENGTH)
        for start, length in ours:
            ll.munmap(start, length)


async def test_file_source_cached(tmp_path: Path) -> None:
    snap = write_snapshot(tmp_path / "mem.snap", LENGTH, evict=False)
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(snap, readahead=(1, 32))
        # make sure the page cache holds it (written just now; read it to be sure)
        snap.read_bytes()
        res = await scan(region.address, LENGTH, threads=2, op="verify")
        assert res.mismatches == 0
        st = pager.stats
        assert st.native_pages == NPAGES and st.python_faults == 0


async def test_file_source_open_file_and_offset(tmp_path: Path) -> None:
    snap = write_snapshot(tmp_path / "mem.snap", LENGTH + 4 * PS, evict=False)
    snap.read_bytes()
    with open(snap, "rb") as f:  # noqa: ASYNC230 - a test fixture file
        async with Pager() as pager:
            region = pager.map(LENGTH)
            region.serve_from(f, offset=4 * PS, readahead=4)
            res = await scan(region.address, LENGTH, op="verify", offset=4 * PS)
            assert res.mismatches == 0


async def test_file_source_not_cached_falls_back(tmp_path: Path) -> None:
    """Without read slots, pages not in the page cache go up to Python (io_uring READ)
    and verify (with them the engine reads them: test_native_engine_io.py)."""
    snap = write_snapshot(tmp_path / "mem.snap", LENGTH, evict=True)
    require_evicted(snap)
    async with Pager(handler_timeout=20, native_read_slots=0) as pager:
        region = pager.map(LENGTH)
        region.serve_from(snap)
        res = await scan(region.address, LENGTH, threads=2, op="verify", order="random")
        assert res.mismatches == 0
        st = pager.stats
        assert st.native_cache_misses > 0 and st.python_faults > 0
        assert st.native_cache_reads == 0 and st.errors == 0
        assert st.native_faults + st.python_faults - st.duplicate_faults >= NPAGES


async def test_file_truncated_under_client_sigbus(tmp_path: Path) -> None:
    """A file truncated while a client runs: the missing pages get SIGBUS (poison
    policy) and nothing hangs."""
    snap = write_snapshot(tmp_path / "mem.snap", LENGTH, evict=False)
    async with Pager(on_error="poison") as pager:
        region = pager.map(LENGTH)
        region.serve_from(snap)
        assert (await scan(region.address, PS * 4, op="verify")).mismatches == 0
        os.truncate(snap, LENGTH // 2)
        status = await child(region.address, LENGTH, op="verify", timeout=60)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS
        # the in-process range still served natively up to the new end
        assert (await scan(region.address + PS * 4, LENGTH // 2 - PS * 4, op="verify",
                           offset=PS * 4)).mismatches == 0
        assert pager.stats.errors >= 1


async def test_native_linger_budget() -> None:
    """With a time budget the engine keeps polling in C; content still verifies."""
    src = pattern_mmap(LENGTH)
    async with Pager(native_reads=64, native_budget_us=200) as pager:
        region = pager.map(LENGTH)
        region.serve_from(src)
        assert (await scan(region.address, LENGTH, threads=2, op="verify")).mismatches == 0
        assert pager.stats.native_reads >= 1


async def test_on_fault_after_serve_from_gets_what_is_passed_up(tmp_path: Path) -> None:
    snap = write_snapshot(tmp_path / "mem.snap", LENGTH, evict=True)
    require_evicted(snap)
    seen: list[int] = []
    async with Pager(native_read_slots=0) as pager:  # misses go up (not read in C)
        region = pager.map(LENGTH)
        region.serve_from(snap)

        @region.on_fault
        def fallback(ev: uffd_aio.PageFault) -> bytes:
            seen.append(ev.offset)
            return bytes(testing.pattern_bytes(ev.offset, ev.page_size))

        assert (await scan(region.address, LENGTH, op="verify")).mismatches == 0
        assert seen and pager.stats.python_faults == len(seen)


async def test_bad_input() -> None:
    async with Pager() as pager:
        region = pager.map(4 * PS)
        with pytest.raises(ValueError, match="missing"):
            region.serve_from(bytes(3 * PS))
        with pytest.raises(TypeError, match="not a buffer"):
            region.serve_from(12345)
        with pytest.raises(ValueError, match="read-ahead"):
            region.serve_from(bytes(4 * PS), readahead=0)
        with pytest.raises(ValueError, match="min < max"):
            region.serve_from(bytes(4 * PS), readahead=(8, 8))
        with pytest.raises(ValueError, match="no offset"):
            region.serve_from(uffd_aio.ZERO, offset=PS)
        with pytest.raises(FileNotFoundError):
            region.serve_from("/nonexistent/snapshot")
        minor = pager.map(4 * PS, mode=Mode.MINOR)
        with pytest.raises(ValueError, match="MISSING"):
            minor.serve_from(bytes(4 * PS))
        await pager.unregister(region)
        with pytest.raises(ValueError, match="not an open region"):
            region.serve_from(bytes(4 * PS))


async def test_file_source_bad_input(tmp_path: Path) -> None:
    snap = write_snapshot(tmp_path / "mem.snap", 2 * PS, evict=False)
    async with Pager() as pager:
        region = pager.map(4 * PS)
        with pytest.raises(ValueError, match="has 8192 bytes"):
            region.serve_from(snap)
        with pytest.raises(ValueError, match="multiple of the page size"):
            region.serve_from(snap, offset=100)
        with pytest.raises(ValueError, match="regular file"):
            region.serve_from(tmp_path)


@pytest.mark.parametrize("read_mode", ["multishot", "poll"])
async def test_other_read_modes(read_mode: str) -> None:
    src = pattern_mmap(LENGTH)
    async with Pager(read_mode=read_mode) as pager:  # type: ignore[arg-type]
        region = pager.map(LENGTH)
        region.serve_from(src, readahead=(1, 8))
        assert (await scan(region.address, LENGTH, threads=2, op="verify")).mismatches == 0
        st = pager.stats
        assert st.native_faults > 0 and st.errors == 0


@pytest.mark.parametrize("readahead", [None, (1, 16)], ids=["ra1", "adaptive"])
async def test_fork_child_served_by_an_engine_of_its_own(readahead: Any) -> None:
    """A fork child's uffd gets an engine with the parent region's source: its faults
    (the half the parent never touched) are resolved in C; the child verifies every
    byte of the range (its exit status)."""
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(pattern_mmap(LENGTH), readahead=readahead)
        assert (await scan(region.address, LENGTH // 2, op="verify")).mismatches == 0
        before = pager.stats.native_faults
        status = await child(region.address, LENGTH, op="verify", timeout=60)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        st = pager.stats
        assert st.forks == 1 and st.python_faults == 0 and st.errors == 0
        assert st.native_faults > before
        assert st.native_pages >= NPAGES  # both halves, once each
        child_ctx = pager._contexts[1]
        assert child_ctx.engine is not None and child_ctx.engine.ranges() == 1


async def test_fork_child_engine_reads_page_cache_misses(tmp_path: Path) -> None:
    """File source, not in the page cache: the child's engine reads the misses with
    io_uring READs on the shared ring, every byte verified by the child."""
    snap = write_snapshot(tmp_path / "mem.snap", LENGTH, evict=True)
    require_evicted(snap)
    async with Pager(handler_timeout=20) as pager:
        region = pager.map(LENGTH)
        region.serve_from(snap, readahead=(1, 8))
        status = await child(region.address, LENGTH, op="verify", timeout=60)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        st = pager.stats
        assert st.forks == 1 and st.errors == 0 and st.python_faults == 0
        assert st.native_cache_reads > 0 and st.native_faults > 0


async def test_fork_child_pieces_go_with_the_parent_source() -> None:
    """Replacing the region's source drops the child's piece first (it copies from the
    old source, which is then unmapped); the child is then served by Python from the
    new source; a child of a region moved by mremap before the fork is served where the
    region is now."""
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(pattern_mmap(LENGTH))
        status = await child(region.address, LENGTH // 2, op="verify", timeout=60)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        child_ctx = pager._contexts[1]
        assert child_ctx.engine is not None and child_ctx.engine.ranges() == 1
        region.serve_from(pattern_mmap(LENGTH))  # a new source: old pieces dropped
        assert child_ctx.engine.ranges() == 0
        status = await child(region.address, LENGTH, op="verify", timeout=60)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert pager.stats.forks == 2 and pager.stats.errors == 0
        # the first child had exited: released when the second fork was followed
        assert pager.stats.forks_released == 1 and child_ctx not in pager._contexts
        assert pager._contexts[-1].engine.ranges() == 1  # the second child: the new source


async def test_fork_child_of_a_file_region_with_an_offset(tmp_path: Path) -> None:
    """A source offset and a piece that does not start at the region's start (the
    parent unmapped the region's first pages before the fork)."""
    snap = tmp_path / "mem.snap"
    snap.write_bytes(testing.pattern_bytes(0, LENGTH + 16 * PS))
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(snap, offset=16 * PS)
        await asyncio.to_thread(ll.munmap, region.address, 8 * PS)  # UNMAP event
        await asyncio.sleep(0.05)
        start = region.address + 8 * PS
        status = await child(start, LENGTH - 8 * PS, op="verify", offset=24 * PS,
                             timeout=60)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        st = pager.stats
        assert st.forks == 1 and st.python_faults == 0 and st.errors == 0


async def test_serve_from_after_unmap_and_remap_serves_where_the_region_is() -> None:
    """serve_from on a region the application cut (UNMAP) and moved (REMAP) before: the
    engine serves its pieces where they are now, from the right source offsets, and not
    the hole, which another (Python-served) region of the same pager took since."""
    n = 32 * PS
    dst = ll.mmap(8 * PS)  # where mremap moves the region's last 8 pages
    other = 0
    try:
        async with Pager() as pager:
            region = pager.map(n)
            a = region.address
            # someone maps over pages 0-7 (UNMAP; mmap MAP_FIXED: no window in which
            # another mmap could take the hole) and registers that: another region
            other = await asyncio.to_thread(
                ll.mmap, 8 * PS, flags=ll.MAP_PRIVATE | ll.MAP_ANONYMOUS | ll.MAP_FIXED,
                addr=a)
            assert other == a
            moved = await asyncio.to_thread(ll.mremap, a + 24 * PS, 8 * PS, 8 * PS,
                                            ll.MREMAP_MAYMOVE | ll.MREMAP_FIXED, dst)
            assert moved == dst  # REMAP: pages 24-31 at dst
            neighbour = pager.register(other, 8 * PS)  # served by Python
            far = 1 << 30  # its content: the pattern at another offset

            @neighbour.on_fault
            def from_far(ev: uffd_aio.PageFault) -> bytes:
                return bytes(testing.pattern_bytes(far + ev.offset, ev.page_size))

            region.serve_from(pattern_mmap(n), readahead=4)
            assert _engine(pager).ranges() == 2  # pages 8-23 here, 24-31 at dst
            assert (await scan(a + 8 * PS, 16 * PS, op="verify", offset=8 * PS)).mismatches == 0
            assert (await scan(dst, 8 * PS, op="verify", offset=24 * PS)).mismatches == 0
            st = pager.stats
            assert st.python_faults == 0 and st.native_pages == 24
            assert (await scan(other, 8 * PS, op="verify", offset=far)).mismatches == 0
            assert pager.stats.python_faults == 8
            await pager.unregister(neighbour)
    finally:
        if other:
            ll.munmap(other, 8 * PS)


async def test_exited_fork_child_engine_is_released(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork child's engine goes with its context once the child has exited: the
    source forgets the child's pieces, and dropping the parent's region afterwards
    touches no freed engine."""
    monkeypatch.setattr("uffd_aio.pager.FORK_REAP_INTERVAL", 0.05)
    async with Pager(handler_timeout=20) as pager:
        region = pager.map(LENGTH)
        region.serve_from(testing.pattern_bytes(0, LENGTH))
        status = await child(region.address, LENGTH, op="verify", timeout=60)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        async with asyncio.timeout(limit(20)):
            while pager.stats.forks_released < 1:  # noqa: ASYNC110 (a counter, polled)
                await asyncio.sleep(0.02)
        (_, _, src), = pager._native.values()
        assert src.forks == [] and len(pager._contexts) == 1
        st = pager.stats
        assert st.forks == 1 and st.native_faults > 0 and st.errors == 0
        await pager.unregister(region)

