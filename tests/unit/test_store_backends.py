"""CompressedBackend and RedisBackend URL handling, without a kernel or a server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uffd_aio.stores import BackendError, PageStore, open_backend
from uffd_aio.stores.compressed import CompressedBackend
from uffd_aio.stores.remote import RedisBackend, _split_url

PS = 4096


def page(i: int) -> bytes:
    return (f"page {i} ".encode() * PS)[:PS]


async def test_compressed_roundtrip_and_zero_pages() -> None:
    be = CompressedBackend(page_size=PS)
    assert isinstance(be, PageStore)
    data = page(0) + bytes(PS) + page(2)
    be.load(0, data)
    st = be.stats
    assert st.pages == 2  # the zero page is not stored
    assert st.ratio > 5
    assert await be.fetch(0, 3 * PS) == data
    assert await be.fetch(PS, PS) is None
    assert await be.fetch(10 * PS, 2 * PS) is None  # never written: zeros
    got = await be.fetch(2 * PS, 2 * PS)
    assert got == page(2) + bytes(PS)
    await be.store(2 * PS, bytes(PS))  # overwriting with zeros frees the page
    assert be.stats.pages == 1 and be.stats.stores == 1
    assert await be.fetch(2 * PS, PS) is None


def test_backend_is_a_deprecated_alias_of_page_store() -> None:
    """The store protocol was called Backend, like resolve's resolver protocol."""
    import uffd_aio.stores
    import uffd_aio.stores.base

    for mod in (uffd_aio.stores, uffd_aio.stores.base):
        with pytest.warns(DeprecationWarning, match="use PageStore"):
            assert mod.Backend is PageStore
    with pytest.raises(AttributeError):
        uffd_aio.stores.base.NoSuchName  # noqa: B018


async def test_compressed_rejects_unaligned() -> None:
    be = CompressedBackend(page_size=PS)
    with pytest.raises(BackendError, match="page-aligned"):
        await be.fetch(1, PS)
    with pytest.raises(BackendError, match="page-aligned"):
        await be.store(0, b"x" * 100)


async def test_compressed_from_spec(tmp_path: Path) -> None:
    f = tmp_path / "snap"
    f.write_bytes(page(0) + page(1) + b"tail")
    be = await open_backend(f"compressed:level=5,file={f},page_size={PS}")
    assert isinstance(be, CompressedBackend) and be.level == 5
    assert await be.fetch(0, 3 * PS) == page(0) + page(1) + b"tail" + bytes(PS - 4)
    bare = CompressedBackend.from_spec(str(f))
    assert bare.stats.pages == 3
    assert (await open_backend("compressed:")).stats.pages == 0
    with pytest.raises(ValueError, match="unknown option"):
        CompressedBackend.from_spec("colour=blue")
    with pytest.raises(ValueError, match="power of two"):
        CompressedBackend.from_spec("page_size=3000")


def test_redis_url_split() -> None:
    url, opts = _split_url("redis://h:7/2?prefix=vm1:&page_size=4096&socket_keepalive=true")
    assert url == "redis://h:7/2?socket_keepalive=true"
    assert opts == {"prefix": "vm1:", "page_size": "4096"}
    url, opts = _split_url("redis+cluster://h:7000?prefix=p")
    assert url == "redis://h:7000" and opts == {"prefix": "p"}


async def test_redis_open_is_lazy_and_parses_options() -> None:
    # nothing listens on port 1: opening must still work (connections are lazy)
    be = await RedisBackend.open("redis://127.0.0.1:1/3?prefix=vm:&retry_for=0.5")
    try:
        assert be.prefix == "vm:" and be.retry_for == 0.5 and not be.cluster
        assert be.key(12) == b"vm:12"
        assert be.page_size == os.sysconf("SC_PAGE_SIZE")
        with pytest.raises(BackendError, match="failed for"):
            await be.fetch(0, be.page_size)  # retried for 0.5 s, then given up
        assert be.retries >= 2 and be.outages == 1
    finally:
        await be.aclose()
    with pytest.raises(ValueError, match="not a Redis URL"):
        await RedisBackend.open("http://x")
