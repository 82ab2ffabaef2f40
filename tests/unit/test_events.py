"""uffd_msg decoding, without the kernel."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uffd_aio import events as ev

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
msgs = st.one_of(
    st.builds(ev.PageFaultMsg, u64, u64, u32),
    st.builds(ev.Fork, u32),
    st.builds(ev.Remap, u64, u64, u64),
    st.builds(ev.Remove, u64, u64),
    st.builds(ev.Unmap, u64, u64),
)


@given(st.lists(msgs, max_size=64))
def test_round_trip(batch: list[ev.Msg]) -> None:
    raw = b"".join(ev.encode(m) for m in batch)
    assert len(raw) == 32 * len(batch)
    assert ev.decode(raw) == batch


def test_pagefault_layout_matches_the_kernel() -> None:
    # struct uffd_msg: event u8 + 7 reserved bytes, flags u64, address u64, ptid u32, pad
    raw = struct.pack("<B7xQQI4x", 0x12, 0b101, 0x7F0000123456, 4242)
    (m,) = ev.decode(raw)
    assert m == ev.PageFaultMsg(address=0x7F0000123456, flags=0b101, thread_id=4242)
    assert isinstance(m, ev.PageFaultMsg)
    assert m.is_write and m.is_minor and not m.is_wp


def test_unknown_event_is_kept() -> None:
    raw = bytes([0x7F]) + bytes(31)
    (m,) = ev.decode(raw)
    assert isinstance(m, ev.UnknownMsg) and m.event == 0x7F and m.raw == raw


@pytest.mark.parametrize("n", [1, 31, 33, 63])
def test_partial_message_is_an_error(n: int) -> None:
    with pytest.raises(ev.DecodeError, match="multiple"):
        ev.decode(bytes(n))


def test_nbytes_limits_decoding() -> None:
    buf = bytearray(ev.encode(ev.Fork(3)) + ev.encode(ev.Fork(4)))
    assert ev.decode(buf, 32) == [ev.Fork(3)]
    with pytest.raises(ev.DecodeError):
        ev.decode(buf, 96)


def test_events_are_frozen() -> None:
    m = ev.Remove(1, 2)
    with pytest.raises(AttributeError):
        m.start = 5  # type: ignore[misc]
