"""The GIL rule: a Python thread touching registered memory deadlocks the pager.

The deadlocked process cannot run Python code, so these tests run it as a
child process and look for the native watchdog's explanation on its stderr.
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time

import pytest

import uffd_aio
from tests.integration.helpers import PS, pattern_handler, scan

CHILD = r"""
import asyncio, ctypes, sys, threading
import uffd_aio

async def main() -> None:
    async with uffd_aio.Pager(stall_warning=0.5, name="gil-test") as pager:
        region = pager.map(4096)
        region.on_fault(lambda ev: None)
        print("ready", flush=True)
        if sys.argv[1] == "loop-thread":
            ctypes.string_at(region.address, 8)   # the loop thread itself faults
        else:
            t = threading.Thread(target=ctypes.string_at, args=(region.address, 8))
            t.start()                             # holds the GIL while it faults
            await asyncio.to_thread(t.join)

asyncio.run(main())
"""


def _stderr_until(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bytes:
    assert proc.stderr is not None
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            out += chunk
    return out


@pytest.mark.parametrize("where", ["loop-thread", "python-thread"])
def test_watchdog_explains_a_gil_deadlock(where: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, where], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        err = _stderr_until(proc, b"docs/gil.md", timeout=30)
        assert proc.poll() is None, f"the child should be deadlocked, it exited: {err!r}"
    finally:
        proc.kill()
        proc.wait(10)
    text = err.decode(errors="replace")
    assert "while holding the GIL" in text and "'gil-test'" in text, text


FORK_CHILD = r"""
import asyncio, mmap, os, sys
import uffd_aio
from uffd_aio import testing

# many mappings: the fork copies them while it holds glibc's malloc locks, which
# widens the window in which the loop thread can block on one
maps = [mmap.mmap(-1, 4096) for _ in range(int(sys.argv[2]))]

async def main() -> None:
    async with uffd_aio.Pager(stall_warning=2.0, name="fork-test") as pager:
        region = pager.map(4096)
        region.on_fault(lambda ev: bytes(4096))

        async def forks() -> None:
            for _ in range(int(sys.argv[1])):
                pid = await testing.fork_touch(region.address, 4096, op="read")
                status = await testing.wait_child(pid)
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status

        # two workers fork at once: one FORK event keeps the loop busy (its read not
        # re-armed yet, allocating) while the other fork holds glibc's malloc locks
        task = asyncio.gather(forks(), forks())
        while not task.done():
            testing.malloc_churn(500)  # the loop thread allocates while the workers fork
            await asyncio.sleep(0)
        await task
        print("forks ok", flush=True)

asyncio.run(main())
"""


def test_fork_from_a_worker_while_the_loop_allocates() -> None:
    """glibc's fork() holds malloc's locks until the pager reads the FORK event, and the
    loop thread that would read it may be waiting for one: fork_touch uses _Fork()."""
    try:
        proc = subprocess.run([sys.executable, "-c", FORK_CHILD, "150", "3000"],
                              capture_output=True, timeout=100)
    except subprocess.TimeoutExpired as exc:
        err = (exc.stderr or b"").decode(errors="replace")
        pytest.fail(f"fork deadlocked with the allocating loop thread; stderr: {err[-2000:]}")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert b"forks ok" in proc.stdout


async def test_no_stall_report_while_serving_normally() -> None:
    stall = 2.0  # TCG in the VM lane is slow
    async with uffd_aio.Pager(stall_warning=stall) as pager:
        region = pager.map(256 * PS)
        region.on_fault(pattern_handler)
        res = await scan(region.address, region.length, op="verify", threads=2)
        assert res.mismatches == 0
        await uffd_aio.testing.read(region.address, PS)
        # an idle loop is no stall: stay idle well past the threshold before looking
        await asyncio.sleep(2 * stall)
        assert pager.ring.stalls_reported == 0
