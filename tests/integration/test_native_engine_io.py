"""Native engine, phase 2 (host kernel): page-cache misses read with io_uring in C.

A file-source fault whose page is not in the page cache becomes an io_uring READ
on the pager's ring into an engine buffer; the COPY happens in C when it
completes.  Faults are made by native threads (uffd_aio.testing) or child
processes; the deterministic cases (two faults on one page in one batch, a
region dropped while its READ is in flight) feed the engine uffd_msg records
directly, from the loop thread, the way the pager's read completion does.
Every byte is verified with the shared pattern.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.limits import limit
from uffd_aio import testing
from uffd_aio.binding import lowlevel as ll
from uffd_aio.pager import Pager

from .helpers import PS, child, require_evicted, scan, write_snapshot

NPAGES = 192
LENGTH = NPAGES * PS
_PAGEFAULT = 0x12


def _engine(pager: Pager) -> Any:
    return pager._main.engine  # type: ignore[union-attr]


def _fault_msgs(*addresses: int) -> bytearray:
    """uffd_msg records of MISSING read faults at ``addresses`` (no thread waits on them)."""
    return bytearray(b"".join(struct.pack("<BBHIQQQ", _PAGEFAULT, 0, 0, 0, 0, a, 0)
                              for a in addresses))


def _feed(pager: Pager, msgs: bytearray) -> int:
    """Run the engine on ``msgs`` as the read completion does; messages left for Python."""
    addr, keep = ll.buffer_address(msgs, writable=True)
    left: int = _engine(pager).run(addr, len(msgs), len(msgs))
    del keep
    pager.ring.flush()  # what the loop does after the completion: submit the READs
    return left


async def _until(pred: Any, timeout: float = 20) -> None:
    """Poll ``pred()`` (completions arrive through the loop) with a deadline."""
    async with asyncio.timeout(limit(timeout)):
        while not pred():  # noqa: ASYNC110 - nothing to wait on but the ring's completions
            await asyncio.sleep(0.002)


async def _settle(pager: Pager) -> None:
    """Until the engine's READs/WRITEs all came back."""
    await _until(lambda: _engine(pager) is None or not _engine(pager).inflight())


@pytest.mark.parametrize("readahead", [None, 8, (1, 32)])
async def test_cache_miss_read_in_c(tmp_path: Path, readahead: Any) -> None:
    """Dropped page cache: every miss is an io_uring READ + COPY in C, no Python."""
    snap = write_snapshot(tmp_path / "mem.snap", LENGTH, evict=True)
    require_evicted(snap)
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(snap, readahead=readahead)
        res = await scan(region.address, LENGTH, threads=2, op="verify", order="random")
        assert res.mismatches == 0
        assert await testing.verify(region.address, LENGTH) == -1
        st = pager.stats
        assert st.native_cache_misses > 0 and st.native_cache_reads > 0
        assert st.native_cache_read_pages >= st.native_cache_reads
        assert st.python_faults == 0 and st.handler_calls == 0 and st.errors == 0
        assert st.native_read_passed_up == 0
        assert st.native_pages == NPAGES


async def test_faults_on_an_inflight_read_wait_for_it(tmp_path: Path) -> None:
    """Two faults on one page and one on the next, in one batch: one READ, the others
    join it, and all three are served by its COPY."""
    snap = write_snapshot(tmp_path / "mem.snap", LENGTH, evict=True)
    require_evicted(snap)
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(snap, readahead=4)
        a = region.address + 10 * PS
        assert _feed(pager, _fault_msgs(a, a + 8, a + PS)) == 0
        assert _engine(pager).inflight() == 1
        await _settle(pager)
        st = pager.stats
        assert st.native_cache_reads == 1 and st.native_read_waits == 2
        assert st.native_faults == 3 and st.native_pages == 4 and st.python_faults == 0
        assert await testing.verify(region.address + 10 * PS, 4 * PS, offset=10 * PS) == -1


async def test_many_threads_on_uncached_pages(tmp_path: Path) -> None:
    """16 threads on the same 8 uncached pages: no page read twice, all verified."""
    snap = write_snapshot(tmp_path / "mem.snap", 8 * PS, evict=True)
    require_evicted(snap)
    async with Pager() as pager:
        region = pager.map(8 * PS)
        region.serve_from(snap, readahead=8)
        results = await asyncio.gather(*(scan(region.address, 8 * PS, threads=4, op="verify")
                                         for _ in range(4)))
        assert all(r.mismatches == 0 for r in results)
        st = pager.stats
        assert st.native_pages == 8 and st.python_faults == 0 and st.errors == 0
        if st.native_ring_writes == 0 or _cached_after_read(snap):
            assert st.native_cache_read_pages <= 8
        else:
            # io_uring WRITEs on a file system without a page cache (the guest's 9p
            # folder): a fault that arrives after its page's WRITE was queued, before it
            # ran, finds the page marked resident but not cached, so it reads it again
            # (the COPY then meets EEXIST and wakes): at most one more read per fault
            assert st.native_cache_read_pages <= 8 + st.faults


def _cached_after_read(path: Path) -> bool:
    """Whether reading the file brings it into the page cache (not on the guest's 9p)."""
    with open(path, "rb") as f:
        f.read()
    try:
        require_evicted(path)
    except pytest.skip.Exception:
        return True
    return False


async def test_truncated_uncached_file_sigbus(tmp_path: Path) -> None:
    """Truncated and not cached: the engine's READ of a page past the new end comes
    back empty, the fault goes up to Python, whose poison policy poisons the page:
    a process touching it gets SIGBUS.  Pages before the end are read in C."""
    snap = write_snapshot(tmp_path / "mem.snap", LENGTH, evict=True)
    require_evicted(snap)
    async with Pager(on_error="poison") as pager:
        region = pager.map(LENGTH)
        region.serve_from(snap, readahead=16)
        os.truncate(snap, LENGTH // 2)
        gone = region.address + LENGTH // 2 + 3 * PS
        assert _feed(pager, _fault_msgs(gone)) == 0
        await _settle(pager)
        await _until(lambda: pager.stats.errors >= 1)
        st = pager.stats
        assert st.native_cache_reads == 1 and st.native_read_passed_up == 1
        # the poisoned page is inherited by a child: touching it is SIGBUS
        status = await child(gone, PS, op="read", timeout=60)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS
        res = await scan(region.address, LENGTH // 2, op="verify", threads=2)
        assert res.mismatches == 0
        assert pager.stats.python_faults == 1  # only the poisoned one


async def test_short_read_passes_up(tmp_path: Path) -> None:
    """A READ that ends at the (new) end of file: the page past it goes to Python."""
    snap = write_snapshot(tmp_path / "mem.snap", LENGTH, evict=True)
    require_evicted(snap)
    seen: list[int] = []
    async with Pager(on_error="zero") as pager:
        region = pager.map(LENGTH)
        region.serve_from(snap, readahead=4)
        fallback = region.fault_handler
        assert fallback is not None

        def spy(ev: Any) -> Any:
            seen.append(ev.offset)
            return fallback(ev)

        region.fault_handler = spy
        os.truncate(snap, 11 * PS)
        a = region.address + 10 * PS
        assert _feed(pager, _fault_msgs(a, a + PS)) == 0
        await _settle(pager)
        await _until(lambda: pager.stats.errors >= 1)  # the fallback meets the end of file
        st = pager.stats
        assert st.native_read_passed_up == 1 and seen == [11 * PS]
        assert await testing.verify(a, PS, offset=10 * PS) == -1  # the page that was read
        assert await testing.read(a + PS, PS) == bytes(PS)  # on_error="zero"


async def test_unregister_while_read_in_flight(tmp_path: Path) -> None:
    """The region goes while its READ is out: the completion finds it gone, touches
    nothing of it, and the engine goes on serving (ASan: scripts/asan.sh)."""
    snap = write_snapshot(tmp_path / "mem.snap", LENGTH, evict=True)
    require_evicted(snap)
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(snap, readahead=8)
        other = pager.map(LENGTH)
        other.serve_from(snap)
        assert _feed(pager, _fault_msgs(region.address, region.address + 40 * PS)) == 0
        assert _engine(pager).inflight() == 2
        await pager.unregister(region)  # synchronous up to the unregister ioctl
        await _settle(pager)
        st = pager.stats
        assert st.native_faults == 0 and st.errors == 0 and st.native_passed_up == 0
        assert (await scan(other.address, LENGTH, op="verify")).mismatches == 0
        # and the same with a REMOVE (madvise DONTNEED) between the READ and its COPY
        b = other.address + 3 * PS
        await asyncio.to_thread(ll.madvise, other.address, LENGTH, ll.MADV_DONTNEED)
        snap2 = write_snapshot(tmp_path / "again.snap", LENGTH, evict=True)
        third = pager.map(LENGTH)
        third.serve_from(snap2)
        assert _feed(pager, _fault_msgs(third.address + 5 * PS)) == 0
        await asyncio.to_thread(ll.madvise, third.address, LENGTH, ll.MADV_DONTNEED)
        await _settle(pager)
        assert (await scan(third.address, LENGTH, op="verify")).mismatches == 0
        assert (await scan(b, PS, op="verify", offset=3 * PS)).mismatches == 0


async def test_close_while_read_in_flight(tmp_path: Path) -> None:
    """The pager (engine, then ring) closes while READs are out: the engine outlives
    its ring's settle, nothing is used after it is freed."""
    snap = write_snapshot(tmp_path / "mem.snap", LENGTH, evict=True)
    require_evicted(snap)
    async with Pager() as pager:
        region = pager.map(LENGTH)
        region.serve_from(snap, readahead=32)
        assert _feed(pager, _fault_msgs(*(region.address + i * 32 * PS
                                          for i in range(NPAGES // 32)))) == 0
        assert _engine(pager).inflight() == NPAGES // 32
    assert pager.stats.errors == 0


async def test_read_on_shared_ring(tmp_path: Path) -> None:
    """Two pagers on one ring: engine CQEs are told apart from the Ring's own."""
    from uffd_aio.ring import Ring

    snap = write_snapshot(tmp_path / "mem.snap", LENGTH, evict=True)
    require_evicted(snap)
    ring = Ring()
    try:
        async with Pager(ring=ring, name="a") as pa, Pager(ring=ring, name="b") as pb:
            ra, rb = pa.map(LENGTH), pb.map(LENGTH)
            ra.serve_from(snap, readahead=(1, 16))
            rb.serve_from(snap)
            res = await asyncio.gather(scan(ra.address, LENGTH, op="verify", order="random"),
                                       scan(rb.address, LENGTH, op="verify"),
                                       ring.nop())
            assert all(r.mismatches == 0 for r in res[:2])
            assert pa.stats.python_faults == 0 and pb.stats.python_faults == 0
    finally:
        ring.close()
