"""Error policies, bad handler results, timeouts and shutdown: no thread is left hanging."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

import uffd_aio
from tests.limits import limit
from uffd_aio import testing
from uffd_aio.binding import lowlevel as ll

from .helpers import PS, child, pattern_handler, scan


def boom(ev: uffd_aio.PageFault) -> bytes:
    raise RuntimeError("backend exploded")


async def test_poison_policy_gives_sigbus_to_the_faulting_child() -> None:
    async with uffd_aio.Pager(on_error="poison") as pager:
        region = pager.map(4 * PS)
        region.on_fault(boom)
        status = await child(region.address, region.length, op="read")
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS
        assert pager.stats.errors == 1 and pager.stats.poisons == 1


async def test_raise_policy_poisons_and_stops_the_pager() -> None:
    with pytest.raises(uffd_aio.PagerFailed) as ei:
        async with uffd_aio.Pager(on_error="raise") as pager:
            region = pager.map(4 * PS)

            @region.on_fault
            async def on_fault(ev: uffd_aio.PageFault) -> bytes:
                await asyncio.sleep(0)
                raise KeyError("page not in store")

            status = await child(region.address, region.length, op="read")
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS
            await asyncio.wait_for(pager.wait_closed(), limit(5))
    assert isinstance(ei.value.__cause__, KeyError)


async def test_zero_policy_serves_zeros_in_process() -> None:
    async with uffd_aio.Pager(on_error="zero") as pager:
        region = pager.map(2 * PS)
        region.on_fault(boom)
        await scan(region.address, region.length)
        assert await region.read(0, 2 * PS) == bytes(2 * PS)
        assert pager.stats.errors == 2


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (b"x" * 100, "non-zero multiple of the page size"),
        (b"", "non-zero multiple"),
        (b"x" * (3 * PS), "past the end"),
        (42, "expected a bytes-like object"),
    ],
)
async def test_bad_handler_results_are_clear_errors(result: object, message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    async with uffd_aio.Pager(on_error="zero") as pager:
        region = pager.map(2 * PS)
        region.on_fault(lambda ev: result)
        await scan(region.address + PS, PS)
        assert pager.stats.errors == 1
        assert await region.read(PS, PS) == bytes(PS)
    assert message in capsys.readouterr().out


async def test_handler_timeout() -> None:
    async with uffd_aio.Pager(on_error="zero", handler_timeout=0.1) as pager:
        region = pager.map(PS)

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes:
            await asyncio.sleep(30)
            return pattern_handler(ev)

        await scan(region.address, PS)
        assert pager.stats.timeouts == 1 and pager.stats.errors == 1


async def test_data_for_a_wp_fault_is_an_error() -> None:
    async with uffd_aio.Pager(on_error="zero") as pager:
        region = pager.map(PS, mode=uffd_aio.Mode.MISSING | uffd_aio.Mode.WP)

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes | None:
            if ev.is_wp:
                return b"\0" * PS  # wrong: WP faults resolve by unprotect
            await ev.copy(testing.pattern_bytes(0, PS), wp=True)
            return None

        await scan(region.address, PS, op="write-word")
        assert pager.stats.errors == 1 and pager.stats.unprotects == 1


async def test_shutdown_with_faults_in_flight_leaves_no_thread_hanging() -> None:
    mem = ll.mmap(4 * PS)
    try:
        started = asyncio.Event()
        async with uffd_aio.Pager(on_error="zero", close_timeout=0.3) as pager:
            region = pager.register(mem, 4 * PS)

            @region.on_fault
            async def on_fault(ev: uffd_aio.PageFault) -> bytes:
                started.set()
                await asyncio.Event().wait()  # never completes
                return b""

            job = asyncio.ensure_future(scan(mem, PS, timeout=30))
            await asyncio.wait_for(started.wait(), limit(10))
            assert pager.stats.inflight == 1
        # the handler was cancelled at close and the policy resolved the fault
        r = await asyncio.wait_for(job, limit(10))
        assert r.pages == 1
        assert pager.stats.errors == 1
    finally:
        ll.munmap(mem, 4 * PS)


def _thread_alive(tid: int) -> bool:
    return os.path.exists(f"/proc/self/task/{tid}")


async def test_cancelled_scan_stops_its_threads() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(256 * PS)
        tids: set[int | None] = set()
        faulting = asyncio.Event()

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes:
            tids.add(ev.thread_id)
            faulting.set()
            await asyncio.sleep(0.01)
            return pattern_handler(ev)

        job = asyncio.ensure_future(testing.scan(region.address, region.length))
        await asyncio.wait_for(faulting.wait(), limit(30))
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        (tid,) = tids  # the one native scan thread (THREAD_ID: its kernel tid)
        assert tid is not None
        # it finishes its current page and exits: 256 pages at >= 10 ms each would keep
        # it faulting for seconds more had the stop request been ignored
        async with asyncio.timeout(limit(30)):
            while True:
                if not _thread_alive(tid):
                    break
                await asyncio.sleep(0.01)
        assert pager.stats.faults < 256
        assert pager.stats.inflight == 0
