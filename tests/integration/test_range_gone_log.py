"""A handler that finds its client gone (RangeGone: ESRCH/ENOENT) is logged at info level,
without a traceback, and is not counted as an error (issue 11 bug 7: every killed client of
`uffd-aio serve` logged an error-level ``handler_failed`` with a traceback)."""

from __future__ import annotations

import errno

from structlog.testing import capture_logs

import uffd_aio
from uffd_aio.uffd import RangeGone

from .helpers import PS, scan


async def test_handler_that_finds_the_process_gone_is_not_an_error() -> None:
    with capture_logs() as logs:
        async with uffd_aio.Pager(on_error="zero") as pager:
            region = pager.map(2 * PS)

            @region.on_fault
            async def on_fault(ev: uffd_aio.PageFault) -> None:
                await ev.zero()  # the faulting (native) thread goes on
                # what a resolve gets once the client process has exited
                raise RangeGone(errno.ESRCH, "No such process", op="copy",
                                address=ev.page, length=PS)

            await scan(region.address, region.length)
            assert pager.stats.errors == 0
    assert not [e for e in logs if e["log_level"] == "error"], logs
    gone = [e for e in logs if e["event"] == "uffd_aio.handler_range_gone"]
    assert len(gone) == 2 and all(e["log_level"] == "info" for e in gone)
    assert not any("exc_info" in e for e in gone)
    assert "No such process" in gone[0]["error"]
