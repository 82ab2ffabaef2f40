"""The io_uring engine on the real kernel, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import os
import select

import pytest

from tests.limits import limit
from uffd_aio.binding import lowlevel as ll
from uffd_aio.ring import Ring


@pytest.fixture
async def ring():
    r = Ring(64)
    yield r
    r.close()


async def test_read_write_file(ring: Ring, tmp_path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        assert await ring.write(fd, b"hello world", 0) == 11
        buf = bytearray(5)
        assert await ring.read(fd, buf, 6) == 5
        assert buf == b"world"
    finally:
        os.close(fd)


async def test_readv_writev(ring: Ring, tmp_path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        assert await ring.writev(fd, [b"abc", b"defg"], 0) == 7
        a, b = bytearray(2), bytearray(5)
        assert await ring.readv(fd, [a, b], 0) == 7
        assert (a, b) == (b"ab", b"cdefg")
    finally:
        os.close(fd)


async def test_fixed_buffers(ring: Ring, tmp_path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    bufs = [bytearray(4096), bytearray(4096)]
    ring.register_buffers(bufs)
    try:
        bufs[0][:4] = b"fix!"
        assert await ring.write_fixed(fd, 0, 0, 4096) == 4096
        assert await ring.read_fixed(fd, 1, 0) == 4096
        assert bufs[1][:4] == b"fix!"
    finally:
        os.close(fd)


async def test_pipe_read_waits_and_cancel(ring: Ring) -> None:
    r, w = os.pipe()
    try:
        buf = bytearray(8)
        t = asyncio.ensure_future(ring.read(r, buf))
        await asyncio.sleep(0.02)
        assert not t.done()
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        for _ in range(100):  # the cancel's CQE drains the op
            if ring.pending() == 0:
                break
            await asyncio.sleep(0.005)
        assert ring.pending() == 0
        t = asyncio.ensure_future(ring.read(r, buf))
        await asyncio.sleep(0.01)
        os.write(w, b"data")
        async with asyncio.timeout(limit(5)):
            assert await t == 4
        assert buf[:4] == b"data"
    finally:
        os.close(r)
        os.close(w)


async def test_poll(ring: Ring) -> None:
    r, w = os.pipe()
    try:
        t = asyncio.ensure_future(ring.poll(r, select.POLLIN))
        await asyncio.sleep(0.01)
        assert not t.done()
        os.write(w, b"x")
        async with asyncio.timeout(limit(5)):
            assert await t & select.POLLIN
    finally:
        os.close(r)
        os.close(w)


async def test_errors_become_oserror(ring: Ring) -> None:
    with pytest.raises(OSError) as ei:
        await ring.read(9999, bytearray(4))
    assert ei.value.errno == 9  # EBADF
    assert "io_uring read fd=9999" in str(ei.value)


async def test_submission_batches_once_per_iteration(ring: Ring) -> None:
    before = ring.submits
    await asyncio.gather(*(ring.nop() for _ in range(50)))
    assert ring.submits - before <= 3


async def test_many_ops_more_than_sq(ring: Ring) -> None:
    results = await asyncio.gather(*(ring.nop() for _ in range(500)))
    assert results == [0] * 500


async def test_probe(ring: Ring) -> None:
    ops = ring.probed_ops
    assert ops["READ"] and ops["WRITE"] and ops["ASYNC_CANCEL"]


async def test_multishot_read_with_provided_buffers(ring: Ring) -> None:
    if not ring.supports(ll.OP_READ_MULTISHOT):
        pytest.skip("kernel io_uring lacks READ_MULTISHOT (6.7+)")
    r, w = os.pipe()
    os.set_blocking(r, False)
    br = ring.provide_buffers(7, 8, 64)
    got: list[bytes] = []
    done = asyncio.Event()

    def cb(res: int, flags: int) -> None:
        if res > 0:
            bid = flags >> ll.CQE_BUFFER_SHIFT
            got.append(br.view(bid, res))
            br.recycle(bid)
        if len(got) == 3 or not flags & ll.CQE_F_MORE:
            done.set()

    ud = ring.submit_read_multishot(r, 7, cb)
    try:
        for chunk in (b"one", b"two", b"three"):
            os.write(w, chunk)
            await asyncio.sleep(0.01)
        async with asyncio.timeout(limit(5)):
            await done.wait()
        assert got == [b"one", b"two", b"three"]
    finally:
        ring.cancel(ud)
        ring.flush()
        os.close(r)
        os.close(w)


async def test_closed_ring_fails_pending(ring: Ring) -> None:
    r, w = os.pipe()
    try:
        t = asyncio.ensure_future(ring.read(r, bytearray(4)))
        await asyncio.sleep(0.01)
        ring.close()
        with pytest.raises(OSError):
            await t
    finally:
        os.close(r)
        os.close(w)


async def test_drain_scheduled_before_close_does_nothing_after(ring: Ring) -> None:
    """An engine drop schedules a drain (Ring.schedule_drain); Pager.aclose may close the
    ring before the loop runs it: it must not reap a freed ring."""
    errors: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        ring.schedule_drain()
        ring.close()
        await asyncio.sleep(0.01)
    finally:
        loop.set_exception_handler(None)
    assert errors == []


async def test_shared_ring_is_one_per_loop_and_counted(tmp_path) -> None:
    a = Ring.shared()
    b = Ring.shared()
    assert a is b and a.is_shared
    p = tmp_path / "f"
    p.write_bytes(b"shared")
    fd = os.open(p, os.O_RDONLY)
    try:
        a.close()  # one reference given back: still open for the other
        assert not b.closed
        buf = bytearray(6)
        assert await b.read(fd, buf, 0) == 6 and bytes(buf) == b"shared"
    finally:
        os.close(fd)
    b.close()
    assert b.closed
    c = Ring.shared()  # a new one after the last reference went
    try:
        assert c is not b and not c.closed
    finally:
        c.close()
    own = Ring()
    try:
        assert not own.is_shared
    finally:
        own.close()
