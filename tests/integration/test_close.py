"""Closing with faults in flight: the error policy is applied (and done) before the uffd closes."""

from __future__ import annotations

import asyncio
import os
import signal

import uffd_aio
from tests.limits import limit
from uffd_aio import testing
from uffd_aio.binding import lowlevel as ll

from .helpers import PS


async def _never(started: asyncio.Event) -> None:
    started.set()
    await asyncio.Event().wait()


async def test_close_poisons_the_pages_of_stuck_handlers_register() -> None:
    """A handler that never returns; aclose() must poison its page before closing the
    uffd: the faulting native thread gets SIGBUS, never zeros."""
    own = ll.mmap(4 * PS)
    try:
        async with asyncio.timeout(limit(30)):
            started = asyncio.Event()
            async with uffd_aio.Pager(on_error="poison", close_timeout=0.2) as pager:
                region = pager.register(own, 4 * PS)

                @region.on_fault
                async def stuck(ev: uffd_aio.PageFault) -> None:
                    await _never(started)

                reader = asyncio.ensure_future(testing.read_catching(region.address + PS, PS))
                await started.wait()
                # leaving the block closes the pager with the handler stuck
            got = await reader
            assert got.sigbus == [0], "the faulting thread did not get SIGBUS"
            assert pager.stats.poisons >= 1
    finally:
        ll.munmap(own, 4 * PS)


async def test_close_poisons_the_pages_of_stuck_handlers_map() -> None:
    """The same for a region the pager mapped itself.  aclose() unmaps that memory right
    after the policy, so an in-process reader could see the mapping vanish (SIGSEGV) before
    it retries the access: a forked child, whose copy of the mapping stays, faults instead
    and must die of SIGBUS (its fault goes through the child's uffd, served by this pager)."""
    async with asyncio.timeout(limit(30)):
        started = asyncio.Event()
        async with uffd_aio.Pager(on_error="poison", close_timeout=0.2) as pager:
            region = pager.map(4 * PS)

            @region.on_fault
            async def stuck(ev: uffd_aio.PageFault) -> None:
                await _never(started)

            pid = await testing.fork_touch(region.address + PS, PS, op="read")
            try:
                await started.wait()
            except BaseException:
                os.kill(pid, signal.SIGKILL)
                raise
        status = await testing.wait_child(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, \
            f"the faulting child was not killed by SIGBUS (wait status {status:#x})"
        assert pager.stats.poisons >= 1


async def test_close_poisons_faults_of_a_handler_that_ignores_cancellation() -> None:
    """A handler that swallows the cancellation: close still applies the policy (once)."""
    own = ll.mmap(2 * PS)
    release = asyncio.Event()
    try:
        async with asyncio.timeout(limit(30)):
            started = asyncio.Event()
            async with uffd_aio.Pager(on_error="poison", close_timeout=0.2) as pager:
                region = pager.register(own, 2 * PS)

                @region.on_fault
                async def stubborn(ev: uffd_aio.PageFault) -> bytes:
                    started.set()
                    while not release.is_set():
                        try:
                            await release.wait()
                        except asyncio.CancelledError:
                            continue
                    return b"x" * PS

                reader = asyncio.ensure_future(testing.read_catching(own, PS))
                await started.wait()
            got = await reader
            assert got.sigbus == [0]
            assert pager.stats.errors == 1
            release.set()
            await asyncio.sleep(0.01)
            assert pager.stats.errors == 1  # the late result is dropped, not a second error
    finally:
        release.set()
        ll.munmap(own, 2 * PS)


async def test_scan_threads_report_sigbus_instead_of_dying() -> None:
    """testing.scan counts poisoned pages (a failing test's threads must not kill the run)."""
    async with asyncio.timeout(limit(30)), uffd_aio.Pager(on_error="poison") as pager:
        region = pager.map(4 * PS)

        @region.on_fault
        def boom(ev: uffd_aio.PageFault) -> bytes:
            if ev.offset == PS:
                raise RuntimeError("page 1 is bad")
            return testing.pattern_bytes(ev.offset, PS)

        r = await testing.scan(region.address, 4 * PS, op="verify")
        assert r.sigbus == 1 and r.mismatches == 1 and r.first_mismatch == PS
