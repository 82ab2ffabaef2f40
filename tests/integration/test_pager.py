"""The Pager on the real kernel: modes, resolutions, dedup, limits, scale."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

import uffd_aio
from tests.limits import limit
from tests.limits import size as scaled
from uffd_aio import Mode, testing
from uffd_aio.binding import lowlevel as ll

from .helpers import PS, child, pattern_handler, scan


async def test_missing_anonymous_async_handler_verified() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(256 * PS)
        calls = []

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes:
            calls.append(ev.offset)
            assert ev.page == region.address + ev.offset
            assert ev.page_size == PS and ev.region is region and not ev.is_wp
            return pattern_handler(ev)

        r = await scan(region.address, region.length, op="verify")
        assert r.mismatches == 0
        assert sorted(calls) == [i * PS for i in range(256)]
        st = pager.stats
        assert st.faults == 256 and st.resolved_pages == 256 and st.copies >= 1
        assert st.errors == 0 and st.latency.count == 256


async def test_sync_handler_and_zero_pages() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(64 * PS)

        @region.on_fault
        def on_fault(ev: uffd_aio.PageFault) -> bytes | None:
            return None if (ev.offset // PS) % 2 else pattern_handler(ev)

        await scan(region.address, region.length)
        data = await region.read(0, 4 * PS)
        assert data[:PS] == testing.pattern_bytes(0, PS)
        assert data[PS : 2 * PS] == bytes(PS)
        assert pager.stats.zeropages >= 1


async def test_eager_handler_runs_without_a_task() -> None:
    seen: list[object] = []
    async with uffd_aio.Pager() as pager:
        region = pager.map(4 * PS)

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes:
            seen.append(asyncio.current_task())
            return pattern_handler(ev)

        await scan(region.address, region.length)
    assert seen == [None] * 4


async def test_suspending_handler_continues_in_a_task() -> None:
    seen: list[object] = []
    async with uffd_aio.Pager() as pager:
        region = pager.map(4 * PS)

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes:
            await asyncio.sleep(0.001)
            seen.append(asyncio.current_task())
            async with asyncio.timeout(limit(5)):  # needs a real task after the first await
                await asyncio.sleep(0)
            return pattern_handler(ev)

        r = await scan(region.address, region.length, op="verify")
        assert r.mismatches == 0
    assert len(seen) == 4 and all(t is not None for t in seen)


async def test_non_eager_handler_can_use_timeout_before_first_await() -> None:
    async with uffd_aio.Pager(eager=False) as pager:
        region = pager.map(2 * PS)

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes:
            async with asyncio.timeout(limit(5)):  # needs a current task: eager=False
                await asyncio.sleep(0)
                return pattern_handler(ev)

        assert (await scan(region.address, region.length, op="verify")).mismatches == 0


async def test_read_ahead_by_return_and_by_explicit_copy() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(128 * PS)
        calls = 0

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes | None:
            nonlocal calls
            calls += 1
            window = min(16 * PS, region.length - ev.offset)
            if calls % 2:
                return bytes(testing.pattern_bytes(ev.offset, window))
            await ev.copy(testing.pattern_bytes(ev.offset, window))
            return None

        r = await scan(region.address, region.length, op="verify")
        assert r.mismatches == 0
        assert calls <= 16  # 128 pages in 16-page windows


async def test_concurrent_faults_on_one_page_run_the_handler_once() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(PS)
        calls = 0

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.3)  # let every thread fault on the page meanwhile
            return pattern_handler(ev)

        results = await asyncio.gather(*(scan(region.address, PS, op="verify")
                                         for _ in range(6)))
        assert all(r.mismatches == 0 for r in results)
        assert calls == 1
        assert pager.stats.duplicate_faults >= 1


async def test_in_flight_handlers_are_bounded() -> None:
    running = peak = 0
    async with uffd_aio.Pager(max_inflight=3) as pager:
        region = pager.map(24 * PS)

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1
            return pattern_handler(ev)

        r = await scan(region.address, region.length, threads=8, op="verify")
        assert r.mismatches == 0
        assert peak == 3


async def test_eight_threads_64_mib_verified_byte_for_byte() -> None:
    size = scaled(64 << 20)  # 16 MiB in the VM lane
    async with uffd_aio.Pager() as pager:
        region = pager.map(size)
        region.on_fault(pattern_handler)
        r = await scan(region.address, region.length, threads=8, op="verify", order="random",
                       timeout=120)
        assert r.mismatches == 0 and r.first_mismatch is None
        assert pager.stats.resolved_pages == size // PS
        # and byte for byte, from a different path than the per-word verify
        assert await testing.read(region.address + (5 << 20), 3 * PS) == \
            testing.pattern_bytes(5 << 20, 3 * PS)


async def test_shmem_missing() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(32 * PS, shared=True)
        assert region.memfd is not None
        region.on_fault(pattern_handler)
        assert (await scan(region.address, region.length, op="verify")).mismatches == 0
        # the data really is in the shmem file
        assert os.pread(region.memfd, PS, 3 * PS) == testing.pattern_bytes(3 * PS, PS)


async def test_minor_faults_on_shmem_with_continue() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(16 * PS, mode=Mode.MINOR)
        assert region.alias is not None
        # fill the page cache through the unregistered alias mapping
        testing.pattern_into(memoryview(bytearray(0)), 0)  # no-op: API smoke
        await asyncio.to_thread(testing.fill_sync, region.alias, region.length)
        minors = 0

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> None:
            nonlocal minors
            assert ev.is_minor
            minors += 1
            return None  # -> CONTINUE

        assert (await scan(region.address, region.length, op="verify")).mismatches == 0
        assert minors == 16 and pager.stats.continues >= 1


async def test_write_protect_faults_and_unprotect() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(8 * PS, mode=Mode.MISSING | Mode.WP)
        kinds: list[str] = []

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes | None:
            if ev.is_wp:
                kinds.append("wp")
                return None  # -> unprotect
            kinds.append("missing")
            await ev.copy(testing.pattern_bytes(ev.offset, PS), wp=True)
            return None

        await scan(region.address, region.length)  # reads: missing faults, mapped read-only
        assert kinds == ["missing"] * 8
        await scan(region.address, region.length, op="write-word")  # writes: WP faults
        assert kinds.count("wp") == 8
        assert pager.stats.unprotects >= 1
        region.write_protect(0, PS)  # protect again: the next write faults again
        await scan(region.address, PS, op="write-word")
        assert kinds.count("wp") == 9


async def test_explicit_zero_and_poison() -> None:
    """ev.zero() maps zero pages; ev.poison() gives the faulting thread SIGBUS (ioctl path)."""
    async with uffd_aio.Pager(backend="ioctl") as pager:
        if not pager.features & uffd_aio.Feature.POISON:
            pytest.skip(f"UFFDIO_POISON needs Linux 6.6 (this is {os.uname().release})")
        region = pager.map(4 * PS)
        calls: list[int] = []

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> None:
            calls.append(ev.offset)
            if ev.offset == 3 * PS:
                assert await ev.poison() == PS
            else:
                assert await ev.zero(3 * PS - ev.offset) == 3 * PS - ev.offset

        await scan(region.address, 3 * PS)  # in-process: one fault zeroes pages 0-2
        assert calls == [0]
        assert await region.read(0, 3 * PS) == bytes(3 * PS)
        assert pager.stats.zeropages == 1 and pager.stats.poisons == 0
        # a poisoned page kills the thread that touches it: fault it from a child
        status = await child(region.address + 3 * PS, PS, op="read")
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, status
        assert calls == [0, 3 * PS]
        st = pager.stats
        assert st.poisons == 1 and st.handler_calls == 2 and st.errors == 0


def _thread_state(tid: int) -> tuple[str, str]:
    """(state letter, wait channel) of a thread of this process; ("gone", "") once it exited."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/self/task/{tid}/wchan") as f:
            return state, f.read().strip()
    except FileNotFoundError:
        return "gone", ""


ASLEEP_IN_FAULT = ("S", "handle_userfault")


async def test_uffd_level_ops_wake_move_dontwake() -> None:
    """pager.uffd's own ioctls: a thread waiting on a page stays asleep after a COPY with
    DONTWAKE (the page is there) until WAKE; MOVE; COPY onto a present page is no error."""
    async with uffd_aio.Pager() as pager:
        region = pager.map(4 * PS)
        uffd = pager.uffd
        waiters: list[int | None] = []
        waiting, release = asyncio.Event(), asyncio.Event()

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes | None:
            if ev.offset != 2 * PS:
                return pattern_handler(ev)
            waiters.append(ev.thread_id)
            waiting.set()
            await release.wait()  # the test resolves this fault through pager.uffd
            return None  # a zero page: EEXIST by then, which changes nothing

        job = asyncio.ensure_future(scan(region.address + 2 * PS, PS, op="verify",
                                         offset=2 * PS))
        try:
            async with asyncio.timeout(limit(30)):
                await waiting.wait()
                (tid,) = waiters
                assert tid is not None
                while True:  # it goes to sleep in the kernel
                    if _thread_state(tid) == ASLEEP_IN_FAULT:
                        break
                    await asyncio.sleep(0.01)
            data = testing.pattern_bytes(2 * PS, 2 * PS)
            addr, keep = ll.buffer_address(data)
            assert uffd.copy(region.address + 2 * PS, addr, 2 * PS, dontwake=True) == 2 * PS
            del keep
            # a wake makes it runnable at once, and the page being there it would not
            # sleep in the fault again: still asleep there means it was not woken
            await asyncio.sleep(0.2)
            assert not job.done()
            assert _thread_state(tid) == ASLEEP_IN_FAULT
            uffd.wake(region.address + 2 * PS, PS)
            r = await asyncio.wait_for(job, limit(30))
            assert r.mismatches == 0  # and it read the copied page
        finally:
            release.set()
        src = ll.mmap(2 * PS)
        try:
            testing.fill_sync(src, 2 * PS)
            if pager.features & uffd_aio.Feature.MOVE:
                assert uffd.move(region.address, src, 2 * PS) == 2 * PS
        finally:
            ll.munmap(src, 2 * PS)
        data = testing.pattern_bytes(2 * PS, PS)
        addr, keep = ll.buffer_address(data)
        # EEXIST is "already resolved", not an error
        assert uffd.copy(region.address + 2 * PS, addr, PS) == PS
        del keep
        r = await scan(region.address, region.length, op="verify")
        assert r.mismatches == 0
        assert waiters == [tid]  # the page-2 handler ran once: nothing faulted there again


async def test_register_callers_memory_and_adopt_errors() -> None:
    addr = ll.mmap(8 * PS)
    try:
        async with uffd_aio.Pager() as pager:
            region = pager.register(addr, 8 * PS)
            region.on_fault(pattern_handler)
            assert (await scan(addr, 8 * PS, op="verify")).mismatches == 0
            with pytest.raises(ValueError, match="multiples"):
                pager.register(addr + 1, PS)
            with pytest.raises(ValueError, match="overlaps"):
                pager.adopt(addr, PS)
        # still mapped: the caller owns it
        assert testing.verify_sync(addr, 8 * PS) == -1
    finally:
        ll.munmap(addr, 8 * PS)


async def test_multishot_and_poll_read_modes() -> None:
    for mode in ("multishot", "poll"):
        async with uffd_aio.Pager(read_mode=mode) as pager:  # type: ignore[arg-type]
            region = pager.map(64 * PS)
            region.on_fault(pattern_handler)
            r = await scan(region.address, region.length, threads=4, op="verify")
            assert r.mismatches == 0, mode


async def test_required_feature_missing_is_named() -> None:
    with pytest.raises(uffd_aio.FeatureUnavailable, match="bit40"):
        async with uffd_aio.Pager(required=1 << 40):
            pass


async def test_use_before_start_is_explained() -> None:
    pager = uffd_aio.Pager()
    with pytest.raises(RuntimeError, match="async with"):
        pager.map(PS)
