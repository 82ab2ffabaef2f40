"""The fault path's shortcuts build the same objects as the normal constructors."""

from __future__ import annotations

from uffd_aio import events
from uffd_aio.events import PageFaultMsg
from uffd_aio.ops import new_op as _new_op
from uffd_aio.resolve import Kind, Op


def test_decode_fast_path_matches_decode_one() -> None:
    msgs = [events.encode_pagefault(0x1000 * i, i & 7, i) for i in range(5)]
    msgs.insert(2, events.encode(events.Remove(0x1000, 0x3000)))
    buf = b"".join(msgs)
    out = events.decode(buf)
    assert out == [events.decode_one(buf, off) for off in range(0, len(buf), events.MSG_SIZE)]
    assert type(out[0]) is PageFaultMsg and hash(out[0]) == hash(PageFaultMsg(0, 0, 0))
    assert events.decode(bytearray(buf) + bytearray(64), len(buf)) == out
    assert events.decode(b"") == []
    one = bytearray(2048)
    for msg in (PageFaultMsg(0x5000, 1, 7), events.Remove(0x1000, 0x2000), events.Fork(9)):
        one[: events.MSG_SIZE] = events.encode(msg)
        assert events.decode(one, events.MSG_SIZE) == [msg]


def test_fast_op_matches_attrs_init() -> None:
    assert _new_op(Kind.COPY, 0x1000, 4096, b"x", False) == Op(Kind.COPY, 0x1000, 4096, b"x")
    assert _new_op(Kind.ZERO, 0x2000, 8192, None, True) == Op(Kind.ZERO, 0x2000, 8192, wp=True)
