"""hugetlbfs 2 MiB pages end to end on the real kernel (as root the pool is reserved here)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

import uffd_aio
from tests.limits import limit
from uffd_aio import Mode, hugepages, testing
from uffd_aio.binding import lowlevel as ll
from uffd_aio.hugepages import HUGE_2M, PageSizeMismatch

from .helpers import PS, scan
from .test_handoff_server import ROOT, _build, children, parse, serving, workload_args

H = HUGE_2M
NEED = 24  # huge pages the tests of this module use at most at once
_NR = f"/sys/kernel/mm/hugepages/hugepages-{H >> 10}kB/nr_hugepages"


@pytest.fixture(scope="module", autouse=True)
def huge_pool() -> Iterator[None]:
    """Reserve NEED more 2 MiB pages for this module; the old pool size afterwards."""
    if H not in hugepages.supported_sizes():
        pytest.skip("this kernel has no 2 MiB hugetlbfs pages")
    total, free = hugepages.pool(H)
    try:
        with open(_NR, "w") as f:
            f.write(str(total + NEED))
    except OSError as exc:
        pytest.skip(f"cannot reserve 2 MiB huge pages ({_NR}: {exc.strerror})")
    try:
        _, free = hugepages.pool(H)
        if free < NEED:
            pytest.skip(f"the kernel reserved only {free} free 2 MiB pages of {NEED} asked "
                        "(memory fragmented or short)")
        yield
    finally:
        with open(_NR, "w") as f:
            f.write(str(total))


def _huge_pattern(ev: uffd_aio.PageFault) -> bytes:
    assert ev.page_size == H and ev.page % H == 0
    return bytes(testing.pattern_bytes(ev.offset, H))


async def test_map_2m_copies_whole_huge_pages() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(8 * H, page_size=H)
        assert region.page_size == H and region.address % H == 0
        assert hugepages.check_range(region.address, region.length, H) == H

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes:
            return _huge_pattern(ev)

        # every 4 KiB page is touched by two threads: faults come once per huge page
        # (plus duplicates), and each is one 2 MiB UFFDIO_COPY
        r = await scan(region.address, region.length, op="verify", threads=2)
        assert r.mismatches == 0
        st = pager.stats
        assert st.handler_calls == 8 and st.resolved_pages == 8
        assert st.resolved_bytes == 8 * H and st.errors == 0


async def test_zero_pages_and_policy_on_hugetlb() -> None:
    # hugetlbfs has no UFFDIO_ZEROPAGE: a zero result, ev.zero() and the error policy's
    # zero pages copy from a zero buffer
    async with uffd_aio.Pager(on_error="zero") as pager:
        region = pager.map(3 * H, page_size=H)

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes | None:
            i = ev.offset // H
            if i == 0:
                return None
            if i == 1:
                await ev.zero()
                return None
            raise RuntimeError("policy: zero")

        await scan(region.address, region.length)
        assert await region.read(0, 64) == bytes(64)
        assert await region.read(3 * H - 64, 64) == bytes(64)
        assert await testing.verify(region.address, 3 * H) == 0  # pattern word 0 is not 0
        st = pager.stats
        assert st.zeropages == 3 and st.errors == 1 and st.resolved_pages >= 2


async def test_register_detects_and_rejects_page_size_mismatch() -> None:
    huge = ll.mmap(2 * H, flags=ll.MAP_PRIVATE | ll.MAP_ANONYMOUS | hugepages.map_flags(H))
    small = ll.mmap(2 * H)
    try:
        async with uffd_aio.Pager() as pager:
            with pytest.raises(PageSizeMismatch, match="KernelPageSize"):
                pager.register(huge, 2 * H, page_size=PS)
            with pytest.raises(PageSizeMismatch, match="4 KiB pages"):
                pager.register(small, 2 * H, page_size=H)
            with pytest.raises(ValueError, match="huge page size"):
                pager.register(small, 2 * H, page_size=3 * PS)
            region = pager.register(huge, 2 * H)  # detected
            assert region.page_size == H
            region.on_fault(_huge_pattern)
            assert (await scan(huge, 2 * H, op="verify")).mismatches == 0
            with pytest.raises(ValueError, match="native engine serves base pages"):
                region.serve_from(uffd_aio.ZERO)
    finally:
        ll.munmap(huge, 2 * H)
        ll.munmap(small, 2 * H)


async def test_minor_continue_on_shared_hugetlbfs() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(4 * H, mode=Mode.MINOR, page_size=H)
        assert region.memfd is not None and region.alias is not None
        # fill the page cache through the unregistered alias, natively
        testing.fill_sync(region.alias, region.length)
        kinds: list[bool] = []

        @region.on_fault
        def on_fault(ev: uffd_aio.PageFault) -> None:
            kinds.append(ev.is_minor)
            return None  # CONTINUE of the whole huge page

        r = await scan(region.address, region.length, op="verify")
        assert r.mismatches == 0 and kinds == [True] * 4
        assert pager.stats.continues == 4


async def test_write_protect_on_hugetlb() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(2 * H, mode=Mode.MISSING | Mode.WP, page_size=H)
        wp_faults = 0

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> None:
            nonlocal wp_faults
            if ev.is_wp:
                wp_faults += 1
                return None  # unprotect the huge page
            await ev.copy(_huge_pattern(ev), wp=True)
            return None

        r = await scan(region.address, region.length, op="write")  # missing, then WP
        assert r.mismatches == 0
        assert wp_faults == 2
        assert (await scan(region.address, region.length, op="verify")).mismatches == 0
        assert pager.stats.unprotects == 2


async def test_remove_on_hugetlb_refaults() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(2 * H, page_size=H)
        calls: list[int] = []
        removes: list[tuple[int, int]] = []
        region.on_fault(lambda ev: calls.append(ev.offset) or _huge_pattern(ev))
        region.on_event(lambda m: removes.append((m.start, m.end)))
        assert (await scan(region.address, region.length, op="verify")).mismatches == 0
        # MADV_DONTNEED of a registered range waits for the REMOVE event to be read:
        # off the loop thread (docs/gil.md)
        await asyncio.wait_for(asyncio.to_thread(ll.madvise, region.address, H,
                                                 ll.MADV_DONTNEED), limit(30))
        assert removes == [(region.address, region.address + H)]
        assert (await scan(region.address, region.length, op="verify")).mismatches == 0
        assert calls == [0, H, 0]


@pytest.fixture
def huge_snapshot(tmp_path: Path) -> Path:
    path = tmp_path / "mem.snap"
    path.write_bytes(testing.pattern_bytes(0, 8 * H))
    return path


async def test_readahead_in_huge_pages(huge_snapshot: Path) -> None:
    from uffd_aio.serving import attach
    from uffd_aio.stores import open_backend

    backend = await open_backend(f"file:{huge_snapshot}")
    async with uffd_aio.Pager() as pager:
        region = pager.map(8 * H, page_size=H)
        att = attach(region, backend, readahead="fixed:4")
        try:
            r = await scan(region.address, region.length, op="verify")
            assert r.mismatches == 0
            assert att.stats.fetches == 2 and att.stats.readahead_pages == 6
            assert pager.stats.handler_calls == 2
        finally:
            await att.aclose()
    await backend.aclose()


def test_handoff_page_size_checked_against_the_peer() -> None:
    import os

    small = ll.mmap(2 * H)
    try:
        with pytest.raises(PageSizeMismatch, match=f"pid {os.getpid()}"):
            hugepages.check_range(small, 2 * H, H, pid=os.getpid(), what="mapping 0")
        assert hugepages.check_range(small, 2 * H, PS, pid=os.getpid()) == PS
        assert hugepages.check_range(small, 2 * H, H, pid=2**22 + 12345) is None  # no such pid
    finally:
        ll.munmap(small, 2 * H)


async def test_map_without_pool_is_a_clear_error() -> None:
    async with uffd_aio.Pager() as pager:
        with pytest.raises(hugepages.HugePagesUnavailable, match="nr_hugepages"):
            pager.map(1 << 40, page_size=H)  # 1 TiB: more than any pool here


@pytest.fixture(scope="module")
def c_workload() -> Path:
    return _build(ROOT / "benchmarks" / "c", "build/workload")


async def test_serve_a_client_with_2m_pages(c_workload: Path, huge_snapshot: Path,
                                            tmp_path: Path) -> None:
    # Firecracker's huge_pages "2M": the handoff says page_size 2097152; the C client maps
    # MAP_HUGETLB memory and verifies every byte it gets from the file backend
    from uffd_aio.stores.file import FileBackend

    sock = str(tmp_path / "uffd.sock")
    backend = await FileBackend.open(huge_snapshot)
    try:
        async with serving(sock, backend, attach_options={"readahead": "fixed:2"}) as server, \
                children() as kids:
            p = await kids.start(*workload_args(c_workload, sock, 8, 2, 2, "--page-size", H))
            rc, out, err = await kids.finish(p)
            assert rc == 0, (out, err)
            doc = parse(out)
            assert doc["verified"] is True and doc["page_size"] == H and doc["pages"] == 8
            await server.wait_clients(0)
            st = server.stats
            assert st.served == 1 and st.errors == 0 and st.resolved_bytes == 8 * H
    finally:
        await backend.aclose()
