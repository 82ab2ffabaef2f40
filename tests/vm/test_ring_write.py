"""The patched kernel's write interface and poll mode, through the Pager (runs in the VM).

Every test here needs the uffd_aio kernel series (``patched_kernel``): on a
stock kernel they skip with the reason; `make -C kernel_patches kernel-test`
runs them in the guest.  Memory is faulted only from native threads
(uffd_aio.testing) or forked children.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

import uffd_aio
from tests.limits import limit
from tests.limits import size as scaled
from uffd_aio import Feature, Mode, resolve_ring, testing
from uffd_aio.binding import lowlevel as ll
from uffd_aio.resolve import Kind, Op
from uffd_aio.resolve_ring import RingWriteExecutor
from uffd_aio.ring import Ring
from uffd_aio.uffd import MmChanging, RangeGone, Userfaultfd

from ..integration.helpers import PS, child, pattern_handler, scan

pytestmark = pytest.mark.patched_kernel


def _ring_only(pager: uffd_aio.Pager, *, explicit: bool = False) -> None:
    """Every resolution went through the write interface: io_uring WRITEs for what
    handlers return, pwrite for explicit ones (ev.copy()...: done when they return)."""
    st = pager.stats
    assert pager.backend == "ring" and st.backend == "ring"
    assert (st.pwrites if explicit else st.ring_writes) >= 1, st
    assert st.ioctls == 0, "a resolution went through an ioctl"


async def test_auto_picks_the_ring_backend_and_copies() -> None:
    async with uffd_aio.Pager() as pager:
        assert pager.features & Feature.WRITE
        assert pager.uffd.writer_fd is not None
        region = pager.map(256 * PS)
        region.on_fault(pattern_handler)
        r = await scan(region.address, region.length, threads=2, op="verify")
        assert r.mismatches == 0
        st = pager.stats
        assert st.faults >= 256 and st.resolved_pages == 256 and st.copies >= 1
        assert st.errors == 0
        _ring_only(pager)


async def test_zero_pages_through_the_ring() -> None:
    async with uffd_aio.Pager(backend="ring") as pager:
        region = pager.map(32 * PS)

        @region.on_fault
        def on_fault(ev: uffd_aio.PageFault) -> bytes | None:
            return None if (ev.offset // PS) % 2 else pattern_handler(ev)

        await scan(region.address, region.length)
        data = await region.read(0, 4 * PS)
        assert data[:PS] == testing.pattern_bytes(0, PS)
        assert data[PS:2 * PS] == bytes(PS)
        assert pager.stats.zeropages >= 1
        _ring_only(pager)


async def test_explicit_zero_range_and_read_ahead_copy() -> None:
    async with uffd_aio.Pager(backend="ring") as pager:
        region = pager.map(16 * PS)

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> None:
            if ev.offset < 8 * PS:
                n = await ev.copy(testing.pattern_bytes(0, 8 * PS), offset=0)
                assert n == 8 * PS
            else:
                assert await ev.zero(region.length - ev.offset) == region.length - ev.offset

        r = await scan(region.address, 8 * PS, op="verify")
        assert r.mismatches == 0
        await scan(region.address + 8 * PS, 8 * PS)
        assert await region.read(8 * PS, 8 * PS) == bytes(8 * PS)
        assert pager.stats.handler_calls == 2
        _ring_only(pager, explicit=True)


async def test_shmem_missing_through_the_ring() -> None:
    async with uffd_aio.Pager(backend="ring") as pager:
        region = pager.map(32 * PS, shared=True)
        assert region.memfd is not None
        region.on_fault(pattern_handler)
        assert (await scan(region.address, region.length, op="verify")).mismatches == 0
        assert os.pread(region.memfd, PS, 3 * PS) == testing.pattern_bytes(3 * PS, PS)
        _ring_only(pager)


async def test_minor_faults_continue_through_the_ring() -> None:
    async with uffd_aio.Pager(backend="ring") as pager:
        region = pager.map(16 * PS, mode=Mode.MINOR)
        assert region.alias is not None
        await asyncio.to_thread(testing.fill_sync, region.alias, region.length)
        minors = 0

        @region.on_fault
        def on_fault(ev: uffd_aio.PageFault) -> None:
            nonlocal minors
            assert ev.is_minor
            minors += 1

        assert (await scan(region.address, region.length, op="verify")).mismatches == 0
        assert minors == 16 and pager.stats.continues >= 1
        _ring_only(pager)


async def test_copy_wp_then_unprotect_through_the_ring() -> None:
    async with uffd_aio.Pager(backend="ring") as pager:
        region = pager.map(8 * PS, mode=Mode.MISSING | Mode.WP)
        kinds: list[str] = []

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> None:
            if ev.is_wp:
                kinds.append("wp")
                return  # -> UNPROTECT write
            kinds.append("missing")
            await ev.copy(testing.pattern_bytes(ev.offset, PS), wp=True)  # COPY|MODE_WP

        await scan(region.address, region.length)
        assert kinds == ["missing"] * 8
        await scan(region.address, region.length, op="write-word")
        assert kinds.count("wp") == 8
        assert pager.stats.unprotects >= 1
        _ring_only(pager)  # the unprotects (returned None)
        _ring_only(pager, explicit=True)  # the COPY|WP (ev.copy)


async def test_poison_through_the_ring_gives_sigbus() -> None:
    async with uffd_aio.Pager(backend="ring") as pager:
        region = pager.map(4 * PS)

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> None:
            assert await ev.poison() == PS

        status = await child(region.address, region.length, op="read")
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS
        assert pager.stats.poisons == 1
        _ring_only(pager, explicit=True)


async def test_fork_child_gets_its_own_writer_fd() -> None:
    async with uffd_aio.Pager(backend="ring") as pager:
        region = pager.map(32 * PS)
        region.on_fault(pattern_handler)
        await scan(region.address, 8 * PS, op="verify")
        status = await child(region.address, region.length, op="verify")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert pager.stats.forks == 1
        _ring_only(pager)


# ---- the backend directly: every op, short counts, EEXIST, errors ------------------


class _Direct:
    """A registered range served by nobody: ops are driven by hand, no thread waits."""

    def __init__(self, n: int, mode: Mode = Mode.MISSING) -> None:
        self.uffd = Userfaultfd.open()
        self.ring = Ring()
        self.backend = RingWriteExecutor.create(self.ring, self.uffd)
        self.n = n
        self.addr = ll.mmap(n * PS)
        self.uffd.register(self.addr, n * PS, mode)

    async def run(self, kind: Kind, page: int, npages: int, data: bytes | None = None,
                  wp: bool = False) -> int:
        fut = self.backend.execute(self.uffd, Op(kind, self.addr + page * PS, npages * PS,
                                                 data, wp))
        async with asyncio.timeout(limit(10)):
            return await fut

    def close(self) -> None:
        self.uffd.close()
        self.ring.close()
        ll.munmap(self.addr, self.n * PS)


@pytest.fixture
async def direct() -> AsyncIterator[_Direct]:
    d = _Direct(16, Mode.MISSING | Mode.WP)
    yield d
    d.close()


async def test_every_op_as_a_write(direct: _Direct) -> None:
    d = direct
    data = bytes(testing.pattern_bytes(0, 2 * PS))
    assert await d.run(Kind.COPY, 0, 2, data) == 2 * PS
    assert await d.run(Kind.ZERO, 2, 2) == 2 * PS
    assert await d.run(Kind.COPY, 4, 1, data[:PS], wp=True) == PS
    assert await d.run(Kind.UNPROTECT, 4, 1) == PS
    assert await d.run(Kind.WAKE, 0, 16) == 16 * PS
    assert await d.run(Kind.POISON, 5, 1) == PS
    assert await testing.read(d.addr, 2 * PS) == data
    assert await testing.read(d.addr + 2 * PS, 2 * PS) == bytes(2 * PS)
    assert d.backend.ring_writes == 6 and d.backend.ioctls == 0


async def test_eexist_pages_are_skipped_and_the_range_woken(direct: _Direct) -> None:
    d = direct
    assert await d.run(Kind.ZERO, 1, 1) == PS  # page 1 exists
    before = d.backend.ring_writes
    data = bytes(testing.pattern_bytes(0, 4 * PS))
    # ring write: short count (page 0); then at once with pwrite: EEXIST (page 1),
    # pages 2-3, and a WAKE of the range
    assert await d.run(Kind.COPY, 0, 4, data) == 4 * PS
    assert d.backend.ring_writes - before == 1 and d.backend.pwrites == 3
    got = await testing.read(d.addr, 4 * PS)
    assert got[:PS] == data[:PS] and got[PS:2 * PS] == bytes(PS) and got[2 * PS:] == data[2 * PS:]
    # all pages there already: every write is EEXIST, still "resolved"
    assert await d.run(Kind.ZERO, 0, 4) == 4 * PS
    assert await d.run(Kind.COPY, 0, 1, data[:PS]) == PS
    # the synchronous twin, as the pager uses it for ev.copy() & co.
    assert d.backend.sync.execute(d.uffd, Op(Kind.COPY, d.addr, 4 * PS, data)) == 4 * PS
    assert d.backend.sync.execute(d.uffd, Op(Kind.ZERO, d.addr + 4 * PS, 2 * PS)) == 2 * PS
    with pytest.raises(RangeGone):
        d.backend.sync.execute(d.uffd, Op(Kind.ZERO, PS, PS))


async def test_errors_map_to_the_ioctl_backends_exceptions(direct: _Direct) -> None:
    d = direct
    outside = ll.mmap(PS)
    try:
        fut = d.backend.execute(d.uffd, Op(Kind.ZERO, outside, PS))
        with pytest.raises(RangeGone) as gone:
            await asyncio.wait_for(fut, limit(10))
        assert gone.value.errno == errno.ENOENT
    finally:
        ll.munmap(outside, PS)
    fut = d.backend.execute(d.uffd, Op(Kind.ZERO, d.addr, PS // 2))  # length not page-sized
    with pytest.raises(uffd_aio.ResolveError) as bad:
        await asyncio.wait_for(fut, limit(10))
    assert bad.value.errno == errno.EINVAL and not isinstance(bad.value, RangeGone)
    assert "UFFDIO_WRITE ZEROPAGE" in str(bad.value)


async def test_eagain_while_an_event_is_pending_is_mm_changing() -> None:
    uffd = Userfaultfd.open(Feature.EVENT_REMOVE, required=Feature.EVENT_REMOVE)
    ring = Ring()
    addr = ll.mmap(4 * PS)
    try:
        backend = RingWriteExecutor.create(ring, uffd)
        uffd.register(addr, 4 * PS)
        fut0 = backend.execute(uffd, Op(Kind.ZERO, addr, 4 * PS))
        assert await asyncio.wait_for(fut0, limit(10)) == 4 * PS
        # MADV_DONTNEED reports REMOVE and waits (in a worker thread) until it is read;
        # meanwhile the mm is "changing" and writes fail with EAGAIN, also through io_uring
        madv = asyncio.ensure_future(asyncio.to_thread(ll.madvise, addr + 2 * PS, PS,
                                                       ll.MADV_DONTNEED))
        seen = None
        async with asyncio.timeout(limit(20)):
            while seen is None:
                try:
                    await backend.execute(uffd, Op(Kind.ZERO, addr, PS))
                except MmChanging as exc:
                    seen = exc
                await asyncio.sleep(0.005)
            assert seen.errno == errno.EAGAIN
            msg = b""
            while not msg:  # read the REMOVE event: madvise returns
                try:
                    msg = os.read(uffd.fd, 32)
                except BlockingIOError:
                    await asyncio.sleep(0.005)
            await madv
        assert await asyncio.wait_for(backend.execute(uffd, Op(Kind.ZERO, addr + 2 * PS, PS)),
                                      limit(10)) == PS
    finally:
        uffd.close()
        ring.close()
        ll.munmap(addr, 4 * PS)


# ---- poll mode -------------------------------------------------------------------


async def test_poll_mode_default_budget_and_faults() -> None:
    async with uffd_aio.Pager(poll=True) as pager:
        assert pager.features & Feature.POLL
        default = resolve_ring.read_poll_sysctl()
        assert pager.poll_budget_ns == (20 if default is None else default) * 1000
        region = pager.map(256 * PS)
        region.on_fault(pattern_handler)
        r = await scan(region.address, region.length, threads=4, op="verify")
        assert r.mismatches == 0
        _ring_only(pager)


async def test_poll_budget_option_sets_uffdio_poll() -> None:
    async with uffd_aio.Pager(poll_budget_us=5, backend="ioctl") as pager:
        assert pager.poll_budget_ns == 5000
        assert resolve_ring.set_poll_budget(pager.uffd, 7000) == 5000  # the old budget
        region = pager.map(64 * PS)
        region.on_fault(pattern_handler)
        assert (await scan(region.address, region.length, threads=2,
                           op="verify")).mismatches == 0
        assert pager.backend == "ioctl" and pager.stats.ring_writes == 0
    with pytest.raises(ValueError):
        uffd_aio.Pager(poll_budget_us=20_000)


async def test_handed_over_uffd_gets_ring_backend_and_poll() -> None:
    uffd = Userfaultfd.open(Feature(0))  # the "VMM" did UFFDIO_API without WRITE/POLL
    assert not uffd.has(Feature.WRITE)
    async with uffd_aio.Pager(uffd=uffd, poll_budget_us=10) as pager:
        assert pager.backend == "ring" and pager.poll_budget_ns == 10_000
        region = pager.map(32 * PS)
        region.on_fault(pattern_handler)
        assert (await scan(region.address, region.length, op="verify")).mismatches == 0
        _ring_only(pager)
    assert uffd.closed and uffd.writer_fd is None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("poll", [False, True], ids=["no-poll", "poll"])
async def test_eight_threads_64_mib_verified_through_the_ring(poll: bool) -> None:
    size = scaled(64 << 20)  # 16 MiB in the VM lane: the same paths, less data
    async with uffd_aio.Pager(backend="ring", poll=poll) as pager:
        region = pager.map(size)
        region.on_fault(pattern_handler)
        r = await scan(region.address, region.length, threads=8, op="verify", order="random",
                       timeout=240)
        assert r.mismatches == 0 and r.first_mismatch is None
        assert pager.stats.resolved_pages == size // PS
        assert await testing.read(region.address + (5 << 20), 3 * PS) == \
            testing.pattern_bytes(5 << 20, 3 * PS)
        _ring_only(pager)


# ---- doctor ----------------------------------------------------------------------


def test_doctor_reports_write_path_and_poll_mode() -> None:
    out = subprocess.run([sys.executable, "-m", "uffd_aio.cli", "doctor", "--json"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    assert checks["patched: WRITE"]["ok"] is True
    assert checks["patched: POLL"]["ok"] is True
    assert checks["write path"]["ok"] is True, checks["write path"]
    assert checks["poll mode"]["ok"] is True, checks["poll mode"]
    assert checks["resolution backend"]["value"].startswith("ring")
    assert resolve_ring.probe_write_path()[0] and resolve_ring.probe_poll_mode()[0]
