"""Decode ``struct uffd_msg`` bytes into frozen events (pure, sans-io).

Nothing here touches the kernel or an event loop, so it is unit-tested on
synthetic bytes.  Layout (include/uapi/linux/userfaultfd.h), 32 bytes::

    u8 event; u8 reserved1; u16 reserved2; u32 reserved3;
    union {
      pagefault: u64 flags; u64 address; u32 ptid;
      fork:      u32 ufd;
      remap:     u64 from; u64 to; u64 len;
      remove:    u64 start; u64 end;        (also UNMAP)
    }
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import attrs

MSG_SIZE = 32

EVENT_PAGEFAULT = 0x12
EVENT_FORK = 0x13
EVENT_REMAP = 0x14
EVENT_REMOVE = 0x15
EVENT_UNMAP = 0x16

PAGEFAULT_FLAG_WRITE = 1 << 0
PAGEFAULT_FLAG_WP = 1 << 1
PAGEFAULT_FLAG_MINOR = 1 << 2

_HEAD = struct.Struct("<B3x4x")
_PF = struct.Struct("<8xQQI4x")
_FORK = struct.Struct("<8xI20x")
_REMAP = struct.Struct("<8xQQQ")
_RANGE = struct.Struct("<8xQQ8x")
_PF_ALL = struct.Struct("<B7xQQI4x")  # event + the pagefault fields, one whole record


@attrs.frozen(slots=True)
class PageFaultMsg:
    """A raw page fault: the pager turns it into a :class:`uffd_aio.PageFault`."""

    address: int
    flags: int
    thread_id: int

    @property
    def is_write(self) -> bool:
        return bool(self.flags & PAGEFAULT_FLAG_WRITE)

    @property
    def is_wp(self) -> bool:
        return bool(self.flags & PAGEFAULT_FLAG_WP)

    @property
    def is_minor(self) -> bool:
        return bool(self.flags & PAGEFAULT_FLAG_MINOR)


def _fast_pagefault() -> Callable[[int, int, int], PageFaultMsg]:
    """A PageFaultMsg constructor for the decode loop: the slots' setters, without the
    generic frozen ``__init__`` (which looks up ``object.__setattr__`` per field).
    PageFaultMsg has no validators or converters, so the result is the same object."""
    new = object.__new__
    slots = PageFaultMsg.__dict__
    set_address = slots["address"].__set__
    set_flags = slots["flags"].__set__
    set_tid = slots["thread_id"].__set__

    def make(address: int, flags: int, thread_id: int) -> PageFaultMsg:
        m = new(PageFaultMsg)
        set_address(m, address)
        set_flags(m, flags)
        set_tid(m, thread_id)
        return m

    return make


_pagefault = _fast_pagefault()


@attrs.frozen(slots=True)
class Fork:
    """The registered process forked; ``ufd`` is a new uffd (in our fd table) for the child."""

    ufd: int


@attrs.frozen(slots=True)
class Remap:
    """mremap() moved ``length`` bytes of registered memory from ``old`` to ``new``."""

    old: int
    new: int
    length: int


@attrs.frozen(slots=True)
class Remove:
    """MADV_DONTNEED/REMOVE dropped [start, end): those pages will fault again."""

    start: int
    end: int


@attrs.frozen(slots=True)
class Unmap:
    """munmap() (or mremap shrink) removed [start, end) from the registered memory."""

    start: int
    end: int


@attrs.frozen(slots=True)
class UnknownMsg:
    """A message with an event code this version does not know; kept, not dropped."""

    event: int
    raw: bytes


Msg = PageFaultMsg | Fork | Remap | Remove | Unmap | UnknownMsg


class DecodeError(ValueError):
    """The buffer is not a whole number of uffd_msg records."""


def decode_one(buf: bytes | bytearray | memoryview, offset: int = 0) -> Msg:
    """Decode the message at ``offset``."""
    (event,) = _HEAD.unpack_from(buf, offset)
    if event == EVENT_PAGEFAULT:
        flags, address, ptid = _PF.unpack_from(buf, offset)
        return PageFaultMsg(address, flags, ptid)
    if event == EVENT_FORK:
        return Fork(_FORK.unpack_from(buf, offset)[0])
    if event == EVENT_REMAP:
        old, new, length = _REMAP.unpack_from(buf, offset)
        return Remap(old, new, length)
    if event == EVENT_REMOVE:
        return Remove(*_RANGE.unpack_from(buf, offset))
    if event == EVENT_UNMAP:
        return Unmap(*_RANGE.unpack_from(buf, offset))
    return UnknownMsg(event, bytes(buf[offset : offset + MSG_SIZE]))


def decode(buf: bytes | bytearray | memoryview, nbytes: int | None = None) -> list[Msg]:
    """Decode ``nbytes`` (default: all) of ``buf`` as consecutive uffd_msg records."""
    n = len(buf) if nbytes is None else nbytes
    if n < 0 or n > len(buf):
        raise DecodeError(f"{n} bytes requested from a {len(buf)}-byte buffer")
    if n % MSG_SIZE:
        raise DecodeError(f"{n} bytes is not a multiple of the {MSG_SIZE}-byte uffd_msg")
    # fast path (this runs per read on the fault path): one C-level unpack of every
    # record with the PAGEFAULT layout; other events are decoded again properly
    if n == MSG_SIZE:  # one fault per read: the common case with one faulting thread
        event, flags, address, ptid = _PF_ALL.unpack_from(buf)
        return [_pagefault(address, flags, ptid) if event == EVENT_PAGEFAULT
                else decode_one(buf, 0)]
    view = buf if n == len(buf) else memoryview(buf)[:n]
    out: list[Msg] = []
    append = out.append
    off = 0
    for event, flags, address, ptid in _PF_ALL.iter_unpack(view):
        append(_pagefault(address, flags, ptid) if event == EVENT_PAGEFAULT
               else decode_one(buf, off))
        off += MSG_SIZE
    return out


def encode_pagefault(address: int, flags: int = 0, thread_id: int = 0) -> bytes:
    """Build a PAGEFAULT message (tests and fuzzing)."""
    return _HEAD.pack(EVENT_PAGEFAULT)[:8] + struct.pack("<QQI4x", flags, address, thread_id)


def encode(msg: Msg) -> bytes:
    """Inverse of :func:`decode_one` (tests and fuzzing)."""
    if isinstance(msg, PageFaultMsg):
        return encode_pagefault(msg.address, msg.flags, msg.thread_id)
    if isinstance(msg, Fork):
        return struct.pack("<B7xI20x", EVENT_FORK, msg.ufd)
    if isinstance(msg, Remap):
        return struct.pack("<B7xQQQ", EVENT_REMAP, msg.old, msg.new, msg.length)
    if isinstance(msg, Remove):
        return struct.pack("<B7xQQ8x", EVENT_REMOVE, msg.start, msg.end)
    if isinstance(msg, Unmap):
        return struct.pack("<B7xQQ8x", EVENT_UNMAP, msg.start, msg.end)
    return msg.raw


#: an ``on_event`` handler (pager or region): sync, or async
EventHandler: TypeAlias = Callable[["Fork | Remap | Remove | Unmap"], "Awaitable[None] | None"]
