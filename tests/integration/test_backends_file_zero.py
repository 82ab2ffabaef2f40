"""FileBackend (io_uring into registered buffers) and ZeroBackend, without a pager."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from uffd_aio import testing
from uffd_aio.ring import Ring
from uffd_aio.stores import open_backend
from uffd_aio.stores.base import BackendError, PageStore
from uffd_aio.stores.file import FileBackend
from uffd_aio.stores.zero import ZeroBackend

PS = 4096


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    p = tmp_path / "mem.snap"
    p.write_bytes(testing.pattern_bytes(0, 100 * PS))
    return p


async def test_zero_backend() -> None:
    b = await open_backend("zero")
    assert isinstance(b, ZeroBackend) and isinstance(b, PageStore)
    assert await b.fetch(0, PS) is None
    with pytest.raises(BackendError, match="read-only"):
        await b.store(0, bytes(PS))
    await b.aclose()


async def test_file_backend_reads(snap: Path) -> None:
    b = await open_backend(f"file:{snap}")
    assert isinstance(b, FileBackend) and isinstance(b, PageStore)
    try:
        assert b.fixed and b.size == 100 * PS
        assert await b.fetch(5 * PS, PS) == testing.pattern_bytes(5 * PS, PS)
        # longer than one pool buffer: read in pieces, in parallel
        big = await b.fetch(0, 100 * PS)
        assert big == testing.pattern_bytes(0, 100 * PS)
        # straddling the end of the file: the tail reads as zeros
        tail = await b.fetch(98 * PS, 4 * PS)
        assert tail == testing.pattern_bytes(98 * PS, 2 * PS) + bytes(2 * PS)
        # entirely past the end: None (the pager maps zero pages)
        assert await b.fetch(200 * PS, PS) is None
        # more fetches at once than pool buffers
        got = await asyncio.gather(*(b.fetch(i * PS, PS) for i in range(100)))
        assert all(g == testing.pattern_bytes(i * PS, PS) for i, g in enumerate(got))
        with pytest.raises(BackendError, match="read-only"):
            await b.store(0, bytes(PS))
        with pytest.raises(BackendError, match="bad range"):
            await b.fetch(-PS, PS)
    finally:
        await b.aclose()
    with pytest.raises(BackendError, match="closed"):
        await b.fetch(0, PS)


async def test_file_backend_small_pool(snap: Path) -> None:
    b = await FileBackend.open(snap, buffers=2, buffer_size=2 * PS)
    try:
        data = await b.fetch(PS, 9 * PS)  # 5 pieces through 2 buffers
        assert data == testing.pattern_bytes(PS, 9 * PS)
        assert b.reads == 5
    finally:
        await b.aclose()


async def test_file_backend_writable(tmp_path: Path) -> None:
    path = tmp_path / "rw.img"
    path.write_bytes(bytes(2 * PS))
    b = await FileBackend.open(path, writable=True)
    try:
        page = testing.pattern_bytes(7 * PS, PS)
        await b.store(3 * PS, page)  # past the old end: the file grows
        assert b.size == 4 * PS
        assert await b.fetch(3 * PS, PS) == page
        assert await b.fetch(2 * PS, PS) == bytes(PS)
    finally:
        await b.aclose()
    assert path.read_bytes()[3 * PS:] == page


async def test_file_backend_without_fixed_buffers(snap: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Ring, bufs: object) -> None:
        raise OSError(12, os.strerror(12))

    monkeypatch.setattr(Ring, "register_buffers", refuse)
    b = await FileBackend.open(snap)
    try:
        assert not b.fixed
        assert await b.fetch(PS, 3 * PS) == testing.pattern_bytes(PS, 3 * PS)
    finally:
        await b.aclose()


async def test_file_backend_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot open the snapshot file"):
        await FileBackend.open(tmp_path / "nope")


async def test_file_backend_nowait(snap: Path) -> None:
    b = await open_backend(f"file:{snap}?nowait")
    assert isinstance(b, FileBackend)
    try:
        assert b.nowait and b.path == str(snap)
        assert await b.fetch(3 * PS, 2 * PS) == testing.pattern_bytes(3 * PS, 2 * PS)
        assert await b.fetch(99 * PS, 2 * PS) == testing.pattern_bytes(99 * PS, PS) + bytes(PS)
        # just written, so in the page cache; unless this filesystem has no RWF_NOWAIT
        # (the VM's tmpfs), where the backend falls back to io_uring reads for good
        assert b.nowait_bytes > 0 or not b.nowait
    finally:
        await b.aclose()
    with pytest.raises(BackendError, match="unknown file backend option"):
        await FileBackend.open(f"{snap}?direct")
