"""Helpers for integration tests: fault memory only from native threads or child processes."""

from __future__ import annotations

import asyncio
import mmap
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.limits import limit
from uffd_aio import testing
from uffd_aio.binding import lowlevel as ll

PS = os.sysconf("SC_PAGE_SIZE")


async def scan(address: int, length: int, *, timeout: float = 30, **kw: Any) -> testing.ScanResult:
    """testing.scan with a deadline (scaled to the machine): a pager bug fails the test
    instead of hanging it."""
    async with asyncio.timeout(limit(timeout)):
        return await testing.scan(address, length, **kw)


async def child(address: int, length: int, *, timeout: float = 30, **kw: Any) -> int:
    """Fork a native child that touches the range; returns its wait status (killed on timeout)."""
    pid = await testing.fork_touch(address, length, **kw)
    try:
        async with asyncio.timeout(limit(timeout)):
            return await testing.wait_child(pid)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(os.waitpid, pid, 0)
        raise


def pattern_handler(ev: Any) -> bytes:
    return bytes(testing.pattern_bytes(ev.offset, ev.page_size))


def pattern_mmap(length: int, offset: int = 0) -> mmap.mmap:
    """The test pattern in anonymous memory: page-aligned, as a copy source should be."""
    buf = mmap.mmap(-1, length)
    testing.pattern_into(memoryview(buf), offset)
    return buf


def drop_page_cache(path: Path) -> None:
    """Write ``path`` back and drop it from the page cache (where the file system can)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_pages(path: Path, length: int) -> int:
    """Pages of ``path``'s first ``length`` bytes in the page cache, asked with mincore(2)
    (a read, even RWF_NOWAIT, would start read-ahead and bring the file back)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = ll.mmap(length, prot=ll.PROT_READ, flags=ll.MAP_SHARED, fd=fd)
        try:
            vec = ll.mincore(addr, length)
        finally:
            ll.munmap(addr, length)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec)


def write_snapshot(path: Path, length: int, *, evict: bool) -> Path:
    """Write the pattern to path; with ``evict``, drop it from the page cache.

    tmpfs keeps its pages (they are the storage), so where the test directory is tmpfs
    (the kernel lane's guest) UFFD_AIO_EVICTABLE_DIR names a folder whose file system
    really reads from its backing store (the guest's 9p result folder): the file goes
    there, under a name unique to the test."""
    if evict and (where := os.environ.get("UFFD_AIO_EVICTABLE_DIR")):
        folder = Path(where) / f"{path.parent.name}-{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / path.name
    path.write_bytes(testing.pattern_bytes(0, length))
    if evict:
        drop_page_cache(path)
    return path


def require_evicted(path: Path) -> None:
    """Skip unless the file's first page really left the page cache (tmpfs, 9p... keep it)."""
    try:
        resident = resident_pages(path, PS)
    except OSError as exc:
        pytest.skip(f"mincore: {exc.strerror}")
    if resident:
        pytest.skip(f"posix_fadvise(DONTNEED) left {path} in the page cache on this filesystem")

