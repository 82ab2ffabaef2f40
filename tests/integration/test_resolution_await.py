"""PageFault's resolution methods are coroutines (issue 15): one called without ``await``
resolves nothing, and the library says so (``uffd_aio.resolution_not_awaited``) instead of
letting the pager's default resolution hide it (a dropped ``ev.copy(data)`` would otherwise
map a zero page without a word)."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

import uffd_aio
from uffd_aio import testing

from .helpers import PS, scan


async def test_a_dropped_resolution_is_reported() -> None:
    with capture_logs() as logs:
        async with uffd_aio.Pager() as pager:
            region = pager.map(2 * PS)

            @region.on_fault
            async def on_fault(ev: uffd_aio.PageFault) -> None:
                ev.copy(testing.pattern_bytes(ev.offset, PS))  # no await: nothing happens

            await scan(region.address, region.length)  # still served: the default (zero)
            assert await region.read(0, region.length) == bytes(region.length)
            assert pager.stats.copies == 0
    dropped = [e for e in logs if e["event"] == "uffd_aio.resolution_not_awaited"]
    assert len(dropped) == 2, logs
    assert all(e["log_level"] == "warning" and e["method"] == "ev.copy()" for e in dropped)
    assert "PageFault(missing read" in dropped[0]["fault"]
    assert "await ev.copy" in dropped[0]["hint"]


async def test_awaited_resolutions_are_quiet_and_work_as_coroutines() -> None:
    with capture_logs() as logs:
        async with uffd_aio.Pager() as pager:
            region = pager.map(4 * PS)

            @region.on_fault
            async def on_fault(ev: uffd_aio.PageFault) -> None:
                data = testing.pattern_bytes(ev.offset, PS)
                if ev.offset == 0:
                    assert await ev.copy(data) == PS
                elif ev.offset == PS:  # a coroutine for asyncio's helpers too
                    assert await asyncio.gather(ev.copy(data)) == [PS]
                elif ev.offset == 2 * PS:
                    assert await asyncio.create_task(ev.copy(data)) == PS
                else:
                    assert await ev.zero() == PS
                    assert ev.page_address == ev.page == region.address + ev.offset

            r = await scan(region.address, 3 * PS, op="verify")
            assert r.mismatches == 0
            await scan(region.address + 3 * PS, PS)
            assert pager.stats.copies == 3 and pager.stats.errors == 0
    assert not [e for e in logs if e["event"] == "uffd_aio.resolution_not_awaited"], logs


def test_a_resolution_returned_by_a_sync_handler_is_awaited_by_the_pager() -> None:
    async def main() -> None:
        async with uffd_aio.Pager() as pager:
            region = pager.map(2 * PS)
            region.on_fault(lambda ev: ev.copy(testing.pattern_bytes(ev.offset, PS)))
            r = await scan(region.address, region.length, op="verify")
            assert r.mismatches == 0 and pager.stats.errors == 0

    with capture_logs() as logs:
        asyncio.run(main())
    assert not [e for e in logs if e["event"] == "uffd_aio.resolution_not_awaited"], logs
