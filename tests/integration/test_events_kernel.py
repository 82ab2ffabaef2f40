"""Non-cooperative events on the real kernel: fork, mremap, MADV_DONTNEED, munmap.

mremap/madvise/munmap of registered memory wait until the pager has read the
event, so they run in a worker thread here (never on the loop thread).
"""

from __future__ import annotations

import asyncio
import os

import pytest

import uffd_aio
from tests.limits import limit
from uffd_aio import testing
from uffd_aio.binding import lowlevel as ll

from .helpers import PS, child, pattern_handler, scan


async def test_fork_child_faults_are_served_through_its_own_uffd() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(32 * PS)
        region.on_fault(pattern_handler)
        forks: list[uffd_aio.Fork] = []
        pager.on_event(lambda ev: forks.append(ev) if isinstance(ev, uffd_aio.Fork) else None)
        await scan(region.address, 8 * PS, op="verify")  # parent touches the first 8 pages
        status = await child(region.address, region.length, op="verify")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert len(forks) == 1 and pager.stats.forks == 1
        assert pager.stats.faults >= 8 + 24  # 24 more from the child


async def test_mremap_moves_the_region() -> None:
    n = 16 * PS
    old = ll.mmap(n)
    new = ll.mmap(n)  # placeholder that mremap replaces
    try:
        async with uffd_aio.Pager() as pager:
            region = pager.register(old, n)
            region.on_fault(pattern_handler)
            remaps: list[uffd_aio.Remap] = []
            region.on_event(lambda ev: remaps.append(ev))
            await scan(old, 4 * PS, op="verify")
            moved = await asyncio.wait_for(asyncio.to_thread(
                ll.mremap, old, n, n, ll.MREMAP_MAYMOVE | ll.MREMAP_FIXED, new), limit(10))
            assert moved == new
            r = await scan(new, n, op="verify")  # offsets still relative to the region
            assert r.mismatches == 0
            assert remaps == [uffd_aio.Remap(old, new, n)]
            assert pager.stats.faults == 16
    finally:
        ll.munmap(new, n)


async def test_madv_dontneed_removes_and_pages_fault_again() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(8 * PS)
        region.on_fault(pattern_handler)
        removes: list[uffd_aio.Remove] = []
        region.on_event(lambda ev: removes.append(ev))
        await scan(region.address, region.length, op="verify")
        await asyncio.wait_for(asyncio.to_thread(
            ll.madvise, region.address + 2 * PS, 3 * PS, ll.MADV_DONTNEED), limit(10))
        assert removes == [uffd_aio.Remove(region.address + 2 * PS, region.address + 5 * PS)]
        r = await scan(region.address, region.length, op="verify")
        assert r.mismatches == 0
        assert pager.stats.faults == 8 + 3 and pager.stats.removes == 1


async def test_munmap_reports_unmap_and_forgets_the_range() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(8 * PS)
        region.on_fault(pattern_handler)
        unmaps: list[uffd_aio.Unmap] = []
        region.on_event(lambda ev: unmaps.append(ev))
        await asyncio.wait_for(asyncio.to_thread(
            ll.munmap, region.address + 4 * PS, 4 * PS), limit(10))
        assert unmaps == [uffd_aio.Unmap(region.address + 4 * PS, region.address + 8 * PS)]
        assert (await scan(region.address, 4 * PS, op="verify")).mismatches == 0
        assert pager.stats.unmaps == 1


async def test_async_event_handler() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(4 * PS)
        region.on_fault(pattern_handler)
        got = asyncio.Event()

        @region.on_event
        async def on_event(ev: object) -> None:
            await asyncio.sleep(0)
            got.set()

        await scan(region.address, region.length)
        await asyncio.wait_for(asyncio.to_thread(
            ll.madvise, region.address, PS, ll.MADV_DONTNEED), limit(10))
        await asyncio.wait_for(got.wait(), limit(5))
        assert testing.verify_sync(region.address + PS, PS, PS) == -1


_MAP_FIXED_NOREPLACE = 0x100000


def _vmas(start: int, end: int) -> list[tuple[int, int, str]]:
    """The mappings of this process overlapping [start, end): (start, end, VmFlags)."""
    out: list[tuple[int, int, str]] = []
    cur: list[int] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                cur = [lo, hi] if lo < end and start < hi else None
            elif head == "VmFlags:" and cur is not None:
                out.append((cur[0], cur[1], line.split(":", 1)[1].strip()))
    return out


def _mapped_unregistered(start: int, end: int) -> bool:
    """[start, end) is mapped (in one or more VMAs: the kernel merges neighbours) and
    none of it is registered with a userfaultfd (VmFlags um/uw/ui)."""
    at = start
    for lo, hi, flags in _vmas(start, end):
        if lo > at or {"um", "uw", "ui"} & set(flags.split()):
            return False
        at = hi
    return at >= end


def _pager_memory(start: int, end: int) -> list[tuple[int, int, str]]:
    """Mappings in [start, end) that look like a pager.map() region's: MAP_NORESERVE
    (VmFlags nr) or registered.  The address space of an unmapped region is handed to
    the next mmap at once (often a new thread's CPython frame stack, VmFlags ac), so
    "nothing mapped there" cannot be asserted."""
    return [v for v in _vmas(start, end) if {"nr", "um", "uw", "ui"} & set(v[2].split())]


async def _map_over(addr: int, length: int) -> int:
    """Someone else's mapping over part of a registered region: mmap(MAP_FIXED) unmaps
    that part (an UNMAP event, read by the pager while this waits in a worker thread)
    and maps new memory there in one step, so no other mmap of this process (a new
    thread's CPython frame stack...) can take the hole in between."""
    got = await asyncio.wait_for(asyncio.to_thread(
        ll.mmap, length, flags=ll.MAP_PRIVATE | ll.MAP_ANONYMOUS | ll.MAP_FIXED, addr=addr),
        limit(10))  # no MAP_NORESERVE: told apart from the region's memory
    assert got == addr
    testing.fill_sync(got, length)  # its content: checked at the end (never registered)
    return got


def _map_at(addr: int, length: int) -> int:
    """Someone else's mapping in a hole (MAP_FIXED_NOREPLACE); skips if another mmap of
    this process took the hole first."""
    try:
        got = ll.mmap(length, flags=ll.MAP_PRIVATE | ll.MAP_ANONYMOUS | _MAP_FIXED_NOREPLACE,
                      addr=addr)
    except FileExistsError:
        pytest.skip("another mapping of this process took the hole first")
    assert got == addr
    testing.fill_sync(got, length)
    return got


async def test_close_unmaps_only_what_is_left_of_an_owned_region() -> None:
    """The application mapped something else over part of a pager.map() region (UNMAP;
    the same as munmap and an mmap taking the hole): closing the pager unmaps the region's remaining
    pieces, never the other mapping (which was a live thread's frame stack in the
    fork-test crash: tests/integration/test_native_engine.py)."""
    n = 16 * PS
    async with uffd_aio.Pager() as pager:
        region = pager.map(n)
        region.on_fault(pattern_handler)
        a = region.address
        other = await _map_over(a + 4 * PS, 4 * PS)
        assert pager.stats.unmaps == 1
        assert (await scan(a, 4 * PS, op="verify")).mismatches == 0
    try:
        # the other mapping is intact and unregistered, the region's pieces are gone
        assert _mapped_unregistered(other, other + 4 * PS)
        assert testing.verify_sync(other, 4 * PS) == -1
        assert _pager_memory(a, a + 4 * PS) == [] and _pager_memory(a + 8 * PS, a + n) == []
    finally:
        ll.munmap(other, 4 * PS)


async def test_unregister_follows_an_owned_region_moved_by_mremap() -> None:
    """An owned region moved by mremap (REMAP): unregister() unregisters and unmaps it
    where it is now, and leaves alone what was mapped at its old address since."""
    n = 8 * PS
    dst = ll.mmap(n)  # placeholder that mremap replaces
    other = 0
    try:
        async with uffd_aio.Pager() as pager:
            region = pager.map(n)
            region.on_fault(pattern_handler)
            old = region.address
            moved = await asyncio.wait_for(asyncio.to_thread(
                ll.mremap, old, n, n, ll.MREMAP_MAYMOVE | ll.MREMAP_FIXED, dst), limit(10))
            assert moved == dst
            other = _map_at(old, n)
            assert (await scan(dst, n, op="verify")).mismatches == 0
            await pager.unregister(region)
            assert _pager_memory(dst, dst + n) == []  # the moved region: unmapped
            assert _mapped_unregistered(other, other + n)
            assert testing.verify_sync(other, n) == -1
    finally:
        if other:
            ll.munmap(other, n)


async def _released(pager: uffd_aio.Pager, n: int) -> None:
    async with asyncio.timeout(limit(20)):
        while pager.stats.forks_released < n:  # noqa: ASYNC110 (a counter, polled)
            await asyncio.sleep(0.02)


async def test_exited_fork_children_are_released(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel says nothing when a fork child exits: the pager probes its children
    (after each fork, and on a timer) and drops the dead ones' contexts (fd, read), so a
    long-running pager of a forking application does not collect them."""
    monkeypatch.setattr("uffd_aio.pager.FORK_REAP_INTERVAL", 0.05)
    async with uffd_aio.Pager() as pager:
        region = pager.map(32 * PS)
        region.on_fault(pattern_handler)
        probe = 64 * 1024
        assert pager.uffd.mm_alive(probe)  # our own address space: alive, nothing installed
        for i in range(3):
            status = await child(region.address, region.length, op="verify")
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            await _released(pager, i + 1)
        st = pager.stats
        assert st.forks == 3 and st.forks_released == 3 and st.errors == 0
        # nothing left of the children; the parent is still served
        assert len(pager._contexts) == 1
        await scan(region.address, region.length, op="verify")
