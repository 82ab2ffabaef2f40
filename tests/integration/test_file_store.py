"""The file store never serves silent zeros: truncated snapshots and block devices."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import structlog

import uffd_aio
from tests.limits import limit
from uffd_aio import testing
from uffd_aio.serving import attach
from uffd_aio.stores.base import BackendError
from uffd_aio.stores.file import FileBackend

from .helpers import PS

NPAGES = 64


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    p = tmp_path / "mem.snap"
    p.write_bytes(testing.pattern_bytes(0, NPAGES * PS))
    return p


@pytest.mark.parametrize("readahead", ["off", "adaptive"])
async def test_truncated_while_served_gives_sigbus_not_zeros(snap: Path, readahead: str) -> None:
    new_end = 40
    async with asyncio.timeout(limit(60)):
        backend = await FileBackend.open(snap)
        try:
            async with uffd_aio.Pager() as pager:  # on_error="poison": SIGBUS
                region = pager.map(NPAGES * PS)
                att = attach(region, backend, readahead=readahead)
                first = await testing.read_catching(region.address, 8 * PS)
                assert first.sigbus == [] and first.data == testing.pattern_bytes(0, 8 * PS)
                os.truncate(snap, new_end * PS)
                with structlog.testing.capture_logs() as logs:
                    got = await testing.read_catching(region.address, NPAGES * PS)
                await att.aclose()
            assert backend.size == NPAGES * PS  # the size announced at open
        finally:
            await backend.aclose()
    bus = set(got.sigbus)
    for p in range(new_end, NPAGES):  # past the new end: SIGBUS, never zeros
        assert p in bus, f"page {p} past the truncated end did not raise SIGBUS"
    for p in range(NPAGES):
        page = got.data[p * PS:(p + 1) * PS]
        if p in bus:
            continue
        # served pages hold the file's data (with read-ahead, a window that crossed the
        # new end may have poisoned a page before it: loud, never wrong data)
        assert page == testing.pattern_bytes(p * PS, PS), f"page {p} holds wrong data"
    if readahead == "off":
        assert bus == set(range(new_end, NPAGES))
    short = [e for e in logs if e["event"] == "uffd_aio.file_short_read"]
    assert short and short[0]["log_level"] == "warning"
    assert {"offset", "expected", "got", "path"} <= set(short[0])
    assert short[0]["got"] < short[0]["expected"]


async def test_short_read_is_an_error_without_a_pager(snap: Path) -> None:
    backend = await FileBackend.open(snap)
    try:
        os.truncate(snap, 10 * PS + 100)
        assert await backend.fetch(0, 10 * PS) == testing.pattern_bytes(0, 10 * PS)
        with pytest.raises(BackendError, match="short read"):
            await backend.fetch(8 * PS, 4 * PS)
        with pytest.raises(BackendError, match="short read"):
            await backend.fetch(20 * PS, PS)
        # past the announced size: zeros, as before
        assert await backend.fetch(NPAGES * PS, PS) is None
    finally:
        await backend.aclose()


def _losetup(*args: str) -> str:
    return subprocess.run(["losetup", *args], check=True, capture_output=True, text=True,
                          timeout=30).stdout.strip()


async def test_block_device_source_is_served_with_its_content(snap: Path) -> None:
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed: cannot make a loop device")
    try:
        dev = _losetup("-f", "--show", str(snap))
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
        err = getattr(exc, "stderr", "") or exc
        pytest.skip(f"cannot set up a loop device here: {err}")
    try:
        assert os.stat(dev).st_size == 0  # what made it look empty
        async with asyncio.timeout(limit(60)):
            backend = await FileBackend.open(dev)
            try:
                assert backend.size == NPAGES * PS
                async with uffd_aio.Pager() as pager:
                    region = pager.map(NPAGES * PS)
                    att = attach(region, backend, readahead="adaptive")
                    got = await testing.read_catching(region.address, NPAGES * PS)
                    await att.aclose()
            finally:
                await backend.aclose()
        assert got.sigbus == []
        assert got.data == testing.pattern_bytes(0, NPAGES * PS)
    finally:
        _losetup("-d", dev)


async def test_stores_share_the_loops_ring(snap: Path) -> None:
    """One io_uring per loop: file stores read on the loop's shared ring; a ring has one
    registered-buffer table, so a second store reads with plain READs until the first
    gives the table back at close."""
    async with asyncio.timeout(limit(60)):
        first = await FileBackend.open(snap)
        second = await FileBackend.open(snap)
        try:
            assert first._ring is second._ring and first._ring.is_shared
            assert first.fixed and not second.fixed
            for b in (first, second):
                data = await b.fetch(3 * PS, 2 * PS)
                assert data is not None and bytes(data) == testing.pattern_bytes(3 * PS, 2 * PS)
        finally:
            await first.aclose()
        try:
            third = await FileBackend.open(snap)
            try:
                assert third.fixed and third._ring is second._ring
                data = await third.fetch(0, PS)
                assert data is not None and bytes(data) == testing.pattern_bytes(0, PS)
            finally:
                await third.aclose()
            ring = second._ring
        finally:
            await second.aclose()
        assert ring.closed


async def test_server_and_file_store_use_one_ring(snap: Path, tmp_path: Path) -> None:
    from .test_handoff_server import serving

    async with asyncio.timeout(limit(60)):
        backend = await FileBackend.open(snap)
        try:
            async with serving(str(tmp_path / "s.sock"), backend) as server:
                assert server._ring is backend._ring and backend._ring.is_shared
            assert not backend._ring.closed  # the store's reference keeps it
        finally:
            await backend.aclose()
        assert backend._ring.closed
