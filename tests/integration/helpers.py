"""Helpers for integration tests: fault memory only from native threads or child processes."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from tests.limits import limit
from uffd_aio import testing

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
