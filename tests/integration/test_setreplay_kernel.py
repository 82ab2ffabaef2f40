"""The working-set installer in one process: ``ua_uffd_copy_pages`` and ``SetInstaller``
against the real kernel (memory is touched only by the native ``testing`` helpers)."""

from __future__ import annotations

import mmap
from array import array

import pytest

from uffd_aio import testing, workingset
from uffd_aio.binding import lowlevel as ll
from uffd_aio.pager import Pager
from uffd_aio.serving.setreplay import SetInstaller, Target

from .helpers import PS, scan

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
