"""The working-set installer in one process: ``ua_uffd_copy_pages`` and ``SetInstaller``
against the real kernel (memory is touched only by the native ``testing`` helpers)."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from array import array
from pathlib import Path

import pytest

from uffd_aio import testing, workingset
from uffd_aio.binding import lowlevel as ll
from uffd_aio.pager import Pager
from uffd_aio.serving.setreplay import SetInstaller, Target

from .helpers import PS, resident_pages, scan, write_snapshot

pytestmark = pytest.mark.timeout(60)
NPAGES = 256


def _source() -> tuple[mmap.mmap, int, object]:
    buf = mmap.mmap(-1, NPAGES * PS)
    buf[:] = testing.pattern_bytes(0, NPAGES * PS)
    addr, keep = ll.buffer_address(buf, writable=True)
    return buf, addr, keep


async def test_copy_pages_runs_eexist_and_counts() -> None:
    buf, src, keep = _source()
    async with Pager() as pager:
        region = pager.map(NPAGES * PS)
        region.serve_from(buf)  # what the installer did not place faults in natively
        fd = pager.uffd_for(region).fd
        rc, (placed, there, left, ioctls, stop) = ll.uffd_copy_pages(
            fd, region.address, src, PS, array("I", [0, 1, 2, 5, 7, 8]))
        assert rc == 6 and (placed, there, left, stop) == (6, 0, 0, 6)
        assert ioctls == 3  # runs 0-2, 5, 7-8
        rc, (placed, there, left, ioctls, stop) = ll.uffd_copy_pages(
            fd, region.address, src, PS, array("I", [1, 2, 3, 4, 5, 6]))
        assert rc == 6 and placed == 3 and there == 3 and stop == 6  # 3, 4, 6 new
        res = await scan(region.address, NPAGES * PS, threads=2, op="verify")
        assert res.mismatches == 0
        assert pager.stats.faults == NPAGES - 9  # the installed pages never faulted
        assert ll.uffd_copy_pages(fd, region.address, src, PS, array("I"))[0] == 0
    del keep  # the buffer goes with the test (the region pinned it while served)


@pytest.mark.parametrize("fill", [False, True])
async def test_installer_set_then_fill(fill: bool) -> None:
    buf, src, keep = _source()
    order = tuple(range(NPAGES - 1, 0, -3))  # every third page, from the end
    ws = workingset.WorkingSet(PS, NPAGES, order)
    async with Pager() as pager:
        region = pager.map(NPAGES * PS)
        region.serve_from(buf)
        target = Target(0, NPAGES, region.address, pager.uffd_for(region).fd)
        plan = workingset.InstallPlan(ws, [(0, NPAGES)], fill=fill, chunk=16, max_run=16)
        phases: list[bool] = []
        inst = SetInstaller(plan, [target], page_size=PS, src_base=src,
                            faults=lambda: pager.stats.faults, set_phase=phases.append)
        m = await inst.run()
        assert phases == [True, False]
        assert m.pages_by_replay == len(order) and m.set_installed_s is not None
        if fill:
            assert m.pages_by_fill == NPAGES - len(order)
            assert m.fully_resident_s is not None
        else:
            assert m.pages_by_fill == 0 and m.fully_resident_s is None
        res = await scan(region.address, NPAGES * PS, threads=2, op="verify")
        assert res.mismatches == 0
        assert pager.stats.faults == (0 if fill else NPAGES - len(order))
    del keep  # the buffer goes with the test (the region pinned it while served)


def _cold_snapshot(path: Path) -> Path:
    """The pattern in a file, written, fsynced and dropped from the page cache; skip where
    the file system keeps it (tmpfs, 9p: UFFD_AIO_EVICTABLE_DIR names one that does not)."""
    path = write_snapshot(path, NPAGES * PS, evict=True)
    if resident_pages(path, NPAGES * PS) > NPAGES // 8:
        pytest.skip(f"posix_fadvise(DONTNEED) left {path} in the page cache on this file system")
    return path


@pytest.mark.parametrize("fill", [False, True])
async def test_installer_cold_snapshot_reads_with_io_uring(tmp_path: Path, fill: bool) -> None:
    """A snapshot that is not in the page cache: the installer reads it with io_uring on
    the pager's ring (never through the mapping, which would block the loop in the copy),
    and every byte arrives."""
    path = _cold_snapshot(tmp_path / "cold.snap")
    order = tuple(range(NPAGES - 1, 0, -3))
    ws = workingset.WorkingSet(PS, NPAGES, order)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    src = ll.mmap(NPAGES * PS, prot=ll.PROT_READ, flags=ll.MAP_SHARED, fd=fd)
    try:
        async with Pager() as pager:
            region = pager.map(NPAGES * PS)
            region.serve_from(path)  # faults (after the set) are served from the file too
            target = Target(0, NPAGES, region.address, pager.uffd_for(region).fd)
            plan = workingset.InstallPlan(ws, [(0, NPAGES)], fill=fill, chunk=32, max_run=32)
            inst = SetInstaller(plan, [target], page_size=PS, src_base=src, ring=pager.ring,
                                src_fd=fd, faults=lambda: pager.stats.faults)
            m = await inst.run()
            assert m.pages_by_replay == len(order)
            placed = m.pages_by_replay + m.pages_by_fill
            assert m.reads > 0 and 0 < m.pages_read <= placed
            # the set was cold: nearly all of it came through io_uring (the kernel's own
            # read-ahead of one READ may make a few neighbours resident before their turn)
            assert m.pages_read >= len(order) // 2
            assert m.deferred == 0
            if fill:
                assert m.pages_by_fill == NPAGES - len(order)
            res = await scan(region.address, NPAGES * PS, threads=2, op="verify")
            assert res.mismatches == 0
            assert pager.stats.faults == (0 if fill else NPAGES - len(order))
    finally:
        ll.munmap(src, NPAGES * PS)
        os.close(fd)


async def test_installer_cold_read_leaves_pages_removed_meanwhile(tmp_path: Path) -> None:
    """Pages the client discards while their READ is in flight are not installed."""
    path = _cold_snapshot(tmp_path / "cold.snap")
    order = tuple(range(NPAGES))
    gone = set(range(10, NPAGES, 7))
    ws = workingset.WorkingSet(PS, NPAGES, order)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    src = ll.mmap(NPAGES * PS, prot=ll.PROT_READ, flags=ll.MAP_SHARED, fd=fd)
    inst: SetInstaller | None = None

    def removed(page: int) -> bool:  # "discarded" once the first READ went out
        return inst is not None and inst.metrics.reads > 0 and page in gone

    try:
        async with Pager() as pager:
            region = pager.map(NPAGES * PS)
            region.serve_from(path)
            target = Target(0, NPAGES, region.address, pager.uffd_for(region).fd,
                            removed=removed)
            plan = workingset.InstallPlan(ws, [(0, NPAGES)], chunk=NPAGES, max_run=NPAGES)
            inst = SetInstaller(plan, [target], page_size=PS, src_base=src, ring=pager.ring,
                                src_fd=fd, faults=lambda: pager.stats.faults)
            m = await inst.run()
            assert m.reads > 0
            assert m.pages_by_replay == NPAGES - len(gone)
            res = await scan(region.address, NPAGES * PS, threads=2, op="verify")
            assert res.mismatches == 0
            assert pager.stats.faults == len(gone)  # left to faults, served from the file
    finally:
        ll.munmap(src, NPAGES * PS)
        os.close(fd)


def test_installer_ring_needs_src_fd() -> None:
    ws = workingset.WorkingSet(PS, NPAGES, (0,))
    plan = workingset.InstallPlan(ws, [(0, NPAGES)])
    with pytest.raises(ValueError, match="together"):
        SetInstaller(plan, [], page_size=PS, src_base=4096, ring=object(),  # type: ignore[arg-type]
                     src_fd=None)


async def test_installer_cancelled_during_cold_reads(tmp_path: Path) -> None:
    """Cancelled while its READs are in flight (the client went away): the installer stops,
    the READs are cancelled with it, and faults serve every byte."""
    path = _cold_snapshot(tmp_path / "cold.snap")
    ws = workingset.WorkingSet(PS, NPAGES, tuple(range(0, NPAGES, 2)))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    src = ll.mmap(NPAGES * PS, prot=ll.PROT_READ, flags=ll.MAP_SHARED, fd=fd)
    try:
        async with Pager() as pager:
            region = pager.map(NPAGES * PS)
            region.serve_from(path)
            target = Target(0, NPAGES, region.address, pager.uffd_for(region).fd)
            plan = workingset.InstallPlan(ws, [(0, NPAGES)], fill=True, chunk=16, max_run=16)
            inst = SetInstaller(plan, [target], page_size=PS, src_base=src, ring=pager.ring,
                                src_fd=fd, faults=lambda: pager.stats.faults)
            inst.read_gap = 0  # many small READs: the cancel lands among them
            task = asyncio.ensure_future(inst.run())
            while inst.metrics.reads == 0 and not task.done():  # noqa: ASYNC110
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            m = inst.metrics
            assert m.fully_resident_s is None or m.pages_by_replay + m.pages_by_fill == NPAGES
            res = await scan(region.address, NPAGES * PS, threads=2, op="verify")
            assert res.mismatches == 0
            assert m.pages_by_replay + m.pages_by_fill + pager.stats.faults >= NPAGES
    finally:
        ll.munmap(src, NPAGES * PS)
        os.close(fd)
