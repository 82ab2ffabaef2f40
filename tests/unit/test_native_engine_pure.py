"""Pure pieces of the native engine, without a uffd: table, read-ahead windows,
compaction of what goes up to Python, argument checks.

The engine gets fd -1: any ioctl fails with EBADF, so every fault on a native
region is passed up too (the error path), which is what these tests rely on.
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uffd_aio import events as ev_mod
from uffd_aio.binding import engine as _engine
from uffd_aio.binding import lowlevel as ll
from uffd_aio.native import readahead_bounds
from uffd_aio.serving.readahead import AdaptiveWindow, FixedWindow, NoReadahead

PS = 4096
BASE = 0x10_0000_0000


def _fault(addr: int, flags: int = 0) -> bytes:
    return struct.pack("<B7xQQI4x", ev_mod.EVENT_PAGEFAULT, flags, addr, 7)


def _range(event: int, start: int, end: int) -> bytes:
    return struct.pack("<B7xQQ8x", event, start, end)


def _remap(old: int, new: int, length: int) -> bytes:
    return struct.pack("<B7xQQQ", ev_mod.EVENT_REMAP, old, new, length)


def _run(e: _engine.Engine, msgs: list[bytes]) -> list[bytes]:
    buf = bytearray(b"".join(msgs) + bytes(ev_mod.MSG_SIZE * 4))
    addr, keep = ll.buffer_address(buf, writable=True)
    n = e.run(addr, len(msgs) * ev_mod.MSG_SIZE, len(buf))
    del keep
    return [bytes(buf[i * 32:(i + 1) * 32]) for i in range(n)]


@pytest.fixture
def engine() -> _engine.Engine:
    e = _engine.Engine(-1)
    yield e
    e.close()


def test_fixed_window(engine: _engine.Engine) -> None:
    rid = engine.add(BASE, 64 * PS, PS, _engine.SRC_ZERO, 0, 0, 8, 8)
    assert [engine.window(rid, p) for p in (0, 8, 3, 60)] == [8, 8, 8, 8]


def test_adaptive_window_matches_the_python_policy(engine: _engine.Engine) -> None:
    """Same answers as handlers.readahead.AdaptiveWindow for one stream."""
    rid = engine.add(BASE, 4096 * PS, PS, _engine.SRC_ZERO, 0, 0, 1, 32)
    py = AdaptiveWindow(1, 32)
    page = 0
    for _ in range(10):
        n = engine.window(rid, page)
        assert n == py.window(page)
        page += n
    assert engine.window(rid, 3000) == py.window(3000) == 1  # random: a new stream
    assert engine.window(rid, page) == py.window(page)  # the old stream continues


@given(st.lists(st.integers(0, 4095), max_size=60))
def test_adaptive_window_bounds(pages: list[int]) -> None:
    e = _engine.Engine(-1)
    try:
        rid = e.add(BASE, 4096 * PS, PS, _engine.SRC_ZERO, 0, 0, 2, 64)
        for p in pages:
            assert 2 <= e.window(rid, p) <= 64
    finally:
        e.close()


def test_compaction_keeps_order(engine: _engine.Engine) -> None:
    engine.add(BASE, 16 * PS, PS, _engine.SRC_ZERO, 0, 0, 1, 1)
    msgs = [_fault(0x1000), _range(ev_mod.EVENT_REMOVE, BASE, BASE + PS), _fault(BASE + 5),
            struct.pack("<B31x", ev_mod.EVENT_FORK), _fault(BASE + PS, 2)]
    out = _run(engine, msgs)
    assert out == msgs  # nothing resolvable with fd -1: all up, in order
    st_ = engine.stats()
    assert st_.passed_up == 5 and st_.native_faults == 0 and st_.ioctls == 1  # one ZEROPAGE


def test_unmap_cuts_and_remap_moves(engine: _engine.Engine) -> None:
    rid = engine.add(BASE, 16 * PS, PS, _engine.SRC_ZERO, 0, 0, 1, 1)
    other = engine.add(BASE + 64 * PS, 4 * PS, PS, _engine.SRC_ZERO, 0, 0, 1, 1)
    assert engine.ranges() == 2
    _run(engine, [_range(ev_mod.EVENT_UNMAP, BASE + 4 * PS, BASE + 6 * PS)])
    assert engine.ranges() == 3  # split in two around the hole
    _run(engine, [_remap(BASE + 8 * PS, BASE + 128 * PS, 8 * PS)])
    assert engine.ranges() == 4  # [0,4) [6,8) [64..68) [128..136)
    ioctls = engine.stats().ioctls
    _run(engine, [_fault(BASE + 4 * PS), _fault(BASE + 10 * PS)])  # holes: no lookup hit
    assert engine.stats().ioctls == ioctls
    _run(engine, [_fault(BASE + 130 * PS)])  # moved: found (the ioctl then fails)
    assert engine.stats().ioctls == ioctls + 1
    engine.drop(rid)
    assert engine.ranges() == 1
    engine.drop(other)
    assert engine.ranges() == 0
    with pytest.raises(OSError) as ei:
        engine.drop(rid)
    assert ei.value.errno == errno.ENOENT


def test_add_checks(engine: _engine.Engine) -> None:
    engine.add(BASE, 4 * PS, PS, _engine.SRC_ZERO, 0, 0, 1, 1)
    bad = [
        (BASE + PS, 4 * PS, PS, _engine.SRC_ZERO, 0, 0, 1, 1),  # overlap
        (BASE + 100, 4 * PS, PS, _engine.SRC_ZERO, 0, 0, 1, 1),  # unaligned
        (BASE * 2, 4 * PS, 3000, _engine.SRC_ZERO, 0, 0, 1, 1),  # page size
        (BASE * 2, 4 * PS, PS, _engine.SRC_MEMORY, 1, 3 * PS, 1, 1),  # source too short
        (BASE * 2, 4 * PS, PS, _engine.SRC_FILE, 100, 4 * PS, 1, 1),  # unaligned mapping
        (BASE * 2, 4 * PS, PS, _engine.SRC_ZERO, 0, 0, 0, 1),  # window 0
        (BASE * 2, 4 * PS, PS, _engine.SRC_ZERO, 0, 0, 4, 2),  # min > max
        (BASE * 2, 4 * PS, PS, _engine.SRC_ZERO, 0, 0, 1, _engine.MAX_WINDOW + 1),
        (BASE * 2, 4 * PS, PS, 9, 0, 0, 1, 1),  # kind
    ]
    for args in bad:
        with pytest.raises(OSError) as ei:
            engine.add(*args)
        assert ei.value.errno in (errno.EINVAL, errno.EEXIST), args
    with pytest.raises(OSError) as ei:
        engine.run(0, 32, 64)
    assert ei.value.errno == errno.EINVAL
    buf = bytearray(64)
    addr, keep = ll.buffer_address(buf, writable=True)
    with pytest.raises(OSError):
        engine.run(addr, 33, 64)  # not whole messages
    with pytest.raises(OSError):
        engine.run(addr, 96, 64)  # more than the buffer
    del keep


def test_readahead_bounds() -> None:
    assert readahead_bounds(None) == (1, 1)
    assert readahead_bounds(NoReadahead()) == (1, 1)
    assert readahead_bounds(16) == (16, 16)
    assert readahead_bounds(FixedWindow(4)) == (4, 4)
    assert readahead_bounds((2, 64)) == (2, 64)
    assert readahead_bounds(AdaptiveWindow(1, 32)) == (1, 32)
    for bad in (0, (4, 4), (0, 8), 5000, True):
        with pytest.raises((ValueError, TypeError)):
            readahead_bounds(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        readahead_bounds("8")  # type: ignore[arg-type]
