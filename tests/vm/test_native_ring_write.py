"""The native engine on the patched kernel: resolutions as io_uring WRITEs (runs in the VM).

With the ring-write backend (``Feature.WRITE``) the engine resolves a fault with
an io_uring WRITE at ``pos = dst | op`` on the uffd's writer fd, prepared on the
pager's ring and submitted with its next io_uring_enter (or by the engine before
it reads the uffd again); a short count or EEXIST is finished with pwrite and
the range woken, as resolve_ring.py does.  Memory is faulted only from native
threads (uffd_aio.testing); the deterministic EEXIST / short-count cases feed the
engine uffd_msg records from the loop thread.  Every byte is verified.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import pytest

import uffd_aio
from uffd_aio import testing
from uffd_aio.binding import lowlevel as ll
from uffd_aio.serving.readahead import AdaptiveWindow

from ..integration.helpers import PS, scan
from ..integration.test_native_engine_io import _engine, _fault_msgs, _feed, _settle

pytestmark = pytest.mark.patched_kernel

NPAGES = 256
LENGTH = NPAGES * PS


def _source(length: int = LENGTH) -> mmap.mmap:
    buf = mmap.mmap(-1, length)
    testing.pattern_into(memoryview(buf), 0)
    return buf


def _ring_writes_only(pager: uffd_aio.Pager) -> None:
    """Everything the engine placed went through io_uring WRITEs on the uffd."""
    st = pager.stats
    assert pager.backend == "ring"
    assert st.native_ring_writes >= 1, st
    assert st.native_ioctls == 0, "the engine resolved with an ioctl"
    assert st.ioctls == 0 and st.python_faults == 0 and st.errors == 0, st


@pytest.mark.parametrize("readahead", [None, 8, AdaptiveWindow(1, 32)])
@pytest.mark.parametrize("threads", [1, 4])
async def test_memory_source_ring_writes(readahead: Any, threads: int) -> None:
    src = _source()
    async with uffd_aio.Pager() as pager:  # auto: the ring backend on this kernel
        region = pager.map(LENGTH)
        region.serve_from(src, readahead=readahead)
        res = await scan(region.address, LENGTH, threads=threads, op="verify",
                         order="random" if threads > 1 else "seq")
        assert res.mismatches == 0
        assert await testing.verify(region.address, LENGTH) == -1
        _ring_writes_only(pager)
        assert pager.stats.native_pages == NPAGES


async def test_zero_source_ring_writes() -> None:
    async with uffd_aio.Pager(backend="ring") as pager:
        region = pager.map(LENGTH)
        region.serve_from(uffd_aio.ZERO, readahead=(2, 16))
        res = await scan(region.address, LENGTH, threads=2, op="read", order="random")
        assert res.mismatches == 0
        assert await testing.read(region.address, LENGTH) == bytes(LENGTH)
        _ring_writes_only(pager)


async def test_file_source_ring_writes(tmp_path: Path) -> None:
    snap = tmp_path / "mem.snap"
    snap.write_bytes(testing.pattern_bytes(0, LENGTH))
    snap.read_bytes()  # in the page cache: COPY writes from the mapping
    async with uffd_aio.Pager(backend="ring") as pager:
        region = pager.map(LENGTH)
        region.serve_from(snap, readahead=(1, 16))
        assert (await scan(region.address, LENGTH, threads=2, op="verify")).mismatches == 0
        _ring_writes_only(pager)


@pytest.mark.parametrize("budget_us", [None, 200.0])
async def test_ring_writes_with_poll_mode(budget_us: float | None) -> None:
    src = _source()
    async with uffd_aio.Pager(backend="ring", poll=True, poll_budget_us=budget_us) as pager:
        assert pager.poll_budget_ns > 0
        region = pager.map(LENGTH)
        region.serve_from(src, readahead=4)
        res = await scan(region.address, LENGTH, threads=2, op="verify", order="random")
        assert res.mismatches == 0
        _ring_writes_only(pager)


async def test_many_threads_one_page_ring_writes() -> None:
    """Threads on the same pages: duplicates meet EEXIST (finished with pwrite + wake)."""
    src = _source(4 * PS)
    async with uffd_aio.Pager(backend="ring") as pager:
        region = pager.map(4 * PS)
        region.serve_from(src)
        res = await scan(region.address, 4 * PS, threads=8, op="verify")
        assert res.mismatches == 0
        _ring_writes_only(pager)


async def test_eexist_finished_with_pwrite_and_wake() -> None:
    """A fault on a page already placed: the one-page WRITE meets EEXIST, which is
    finished synchronously (skip, then an OP_WAKE write), as resolve_ring does."""
    src = _source(8 * PS)
    async with uffd_aio.Pager(backend="ring") as pager:
        region = pager.map(8 * PS)
        region.serve_from(src)
        assert (await scan(region.address, PS, op="verify")).mismatches == 0
        before = pager.stats
        assert _feed(pager, _fault_msgs(region.address)) == 0
        await _settle(pager)
        st = pager.stats
        assert st.native_ring_writes == before.native_ring_writes + 1
        assert st.native_pwrites >= before.native_pwrites + 1  # the wake
        assert st.native_faults == before.native_faults + 1 and st.python_faults == 0


async def test_short_count_continued_with_pwrite() -> None:
    """A window WRITE that stops at a page placed behind the engine's back: the
    rest is written with pwrite past it, and every page verifies."""
    src = _source(8 * PS)
    async with uffd_aio.Pager(backend="ring") as pager:
        region = pager.map(8 * PS)
        region.serve_from(src, readahead=8)
        page3 = bytes(testing.pattern_bytes(3 * PS, PS))
        addr, keep = ll.buffer_address(page3)
        rc, done = ll.uffd_copy(pager.uffd.fd, region.address + 3 * PS, addr, PS, 0)
        del keep
        assert rc == 0 and done == PS
        assert _feed(pager, _fault_msgs(region.address)) == 0
        await _settle(pager)
        st = pager.stats
        assert st.native_ring_writes == 1 and st.native_pwrites >= 2, st
        assert await testing.verify(region.address, 8 * PS) == -1
        assert st.native_faults == 1 and st.python_faults == 0 and st.errors == 0


async def test_ioctl_backend_keeps_ioctls() -> None:
    src = _source()
    async with uffd_aio.Pager(backend="ioctl") as pager:
        region = pager.map(LENGTH)
        region.serve_from(src, readahead=8)
        assert (await scan(region.address, LENGTH, op="verify")).mismatches == 0
        st = pager.stats
        assert st.native_ring_writes == 0 and st.native_ioctls >= 1


async def test_unregister_with_writes_queued() -> None:
    """Drop a region whose WRITEs are prepared but not submitted: dropping waits for
    them (they read the source), and the engine goes on."""
    src = _source()
    async with uffd_aio.Pager(backend="ring") as pager:
        region = pager.map(LENGTH)
        region.serve_from(src, readahead=4)
        other = pager.map(LENGTH)
        other.serve_from(_source())
        msgs = _fault_msgs(*(region.address + i * 4 * PS for i in range(16)))
        addr, keep = ll.buffer_address(msgs, writable=True)
        assert _engine(pager).run(addr, len(msgs), len(msgs)) == 0  # prepared, not submitted
        del keep
        assert _engine(pager).inflight() == 16
        await pager.unregister(region)
        assert _engine(pager).inflight() == 0
        del src
        assert (await scan(other.address, LENGTH, op="verify", threads=2)).mismatches == 0
        _ring_writes_only(pager)
