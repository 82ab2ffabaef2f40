"""MOVE as a resolution (UFFDIO_MOVE, 6.8+): ev.move() and handlers returning Moved.

The handler's pages live in its own anonymous mapping (a staging buffer, as a
decompression buffer would be), written by native code (testing.fill_sync), never
by Python touching registered memory.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

import uffd_aio
from uffd_aio import Feature, Moved, MoveError, testing
from uffd_aio.binding import lowlevel as ll
from uffd_aio.uffd import available_features

from .helpers import PS, child, pattern_handler, scan

pytestmark = pytest.mark.skipif(not available_features() & Feature.MOVE,
                                reason="this kernel has no UFFDIO_MOVE (6.8+)")

N = 64


@pytest.fixture
def stage() -> Iterator[int]:
    """N pages of private anonymous memory holding the pattern (written natively)."""
    addr = ll.mmap(N * PS)
    testing.fill_sync(addr, N * PS)
    yield addr
    ll.munmap(addr, N * PS)


def _is_hole(addr: int, length: int) -> bool:
    # the staging buffer is not registered: reading it from Python is safe; a moved-out
    # page is a hole again and reads as zeros
    return ll.read_memory(addr, length) == bytes(length)


async def test_ev_move_is_zero_copy_and_skips_the_default(stage: int) -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(N * PS)
        results = []

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> None:
            results.append(await ev.move(stage + ev.offset))

        r = await scan(region.address, region.length, op="verify")
        assert r.mismatches == 0
        assert results == [PS] * N
        st = pager.stats
        # every fault moved; the pager's default (a zero page) never ran after it
        assert (st.moves, st.copies, st.zeropages, st.errors) == (N, 0, 0, 0)
        assert st.resolved_pages == N and st.resolved_bytes == N * PS
        assert _is_hole(stage, N * PS)  # the pages left the staging buffer


async def test_handler_returns_moved_with_readahead(stage: int) -> None:
    window = 16
    async with uffd_aio.Pager() as pager:
        region = pager.map(N * PS)

        @region.on_fault
        def on_fault(ev: uffd_aio.PageFault) -> Moved:
            start = ev.offset // (window * PS) * window * PS  # whole windows: never a hole
            return Moved(stage + start, window * PS) if start == ev.offset else Moved(
                stage + ev.offset)

        r = await scan(region.address, region.length, op="verify")
        assert r.mismatches == 0
        st = pager.stats
        assert st.moves == st.handler_calls == N // window  # read-ahead: one move a window
        assert st.copies == st.zeropages == st.errors == 0
        assert _is_hole(stage, N * PS)


async def test_move_errors_are_clear_and_recoverable(stage: int) -> None:
    hole = ll.mmap(PS)  # never written: a hole
    seen: dict[int, BaseException] = {}
    try:
        async with uffd_aio.Pager() as pager:
            region = pager.map(8 * PS)

            @region.on_fault
            async def on_fault(ev: uffd_aio.PageFault) -> bytes | None:
                i = ev.offset // PS
                try:
                    if i == 0:
                        await ev.move(stage)
                    elif i == 1:
                        await ev.move(hole)  # ENOENT
                    elif i == 2:
                        await ev.move(stage + PS, offset=0)  # page 0 is there: EEXIST
                    elif i == 3:
                        await ev.move(stage + 3 * PS + 8)  # misaligned
                    elif i == 4:
                        await ev.move(region.address + 4 * PS)  # the destination itself
                    elif i == 7:  # a fork shared the source's pages with a child: EBUSY
                        assert await child(stage + 7 * PS, PS, op="verify",
                                           offset=7 * PS) == 0
                        await ev.move(stage + 7 * PS)
                    else:
                        await ev.move(stage + ev.offset, PS)
                except (MoveError, uffd_aio.BadHandlerResult) as exc:
                    seen[i] = exc
                    return pattern_handler(ev)  # fall back to a copy
                return None

            r = await scan(region.address, region.length, op="verify")
            assert r.mismatches == 0
            assert sorted(seen) == [1, 2, 3, 4, 7]
            e1, e2, e5 = seen[1], seen[2], seen[7]
            assert isinstance(e1, MoveError) and e1.errno == errno.ENOENT
            assert "allow_src_holes" in str(e1) and e1.done == 0 and e1.src == hole
            assert isinstance(e2, MoveError) and e2.errno == errno.EEXIST
            assert isinstance(e5, MoveError) and e5.errno == errno.EBUSY
            assert "shared" in str(e5)
            assert "page-aligned" in str(seen[3]) and "overlaps" in str(seen[4])
            st = pager.stats
            assert st.moves == 3 and st.copies == 5 and st.errors == 0
    finally:
        ll.munmap(hole, PS)


async def test_allow_src_holes_leaves_the_page_missing(stage: int) -> None:
    hole = ll.mmap(2 * PS)
    testing.fill_sync(hole + PS, PS, PS)  # page 0 a hole, page 1 data
    calls: list[int] = []
    try:
        async with uffd_aio.Pager() as pager:
            region = pager.map(2 * PS)

            @region.on_fault
            async def on_fault(ev: uffd_aio.PageFault) -> bytes | None:
                calls.append(ev.offset)
                if len(calls) == 1:
                    assert await ev.move(hole, 2 * PS, allow_src_holes=True) == 2 * PS
                    return None
                return pattern_handler(ev)  # page 0 faulted again: still missing

            r = await scan(region.address, region.length, op="verify")
            assert r.mismatches == 0
            assert calls == [0, 0]
            assert pager.stats.moves == 1 and pager.stats.copies == 1
    finally:
        ll.munmap(hole, 2 * PS)


async def test_moved_result_failures_meet_the_error_policy(stage: int) -> None:
    gone = ll.mmap(PS)
    ll.munmap(gone, PS)  # an address with no mapping
    async with uffd_aio.Pager(on_error="zero") as pager:
        region = pager.map(2 * PS)
        shared = pager.map(PS, shared=True)

        @region.on_fault
        def on_fault(ev: uffd_aio.PageFault) -> Moved:
            return Moved(stage + 40 * PS + 8 if ev.offset else gone)

        @shared.on_fault
        def on_shared(ev: uffd_aio.PageFault) -> Moved:
            return Moved(stage)

        # page 0: the kernel refuses an unmapped source (MoveError); page 1: a misaligned
        # source; the shared region: MOVE needs private anonymous memory (BadHandlerResult)
        r = await scan(region.address, region.length, op="verify")
        assert r.mismatches == 2  # zero pages, by the policy
        await scan(shared.address, PS)
        st = pager.stats
        assert st.errors == 3 and st.moves == 0 and st.zeropages == 3
