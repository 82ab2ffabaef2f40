"""Thin typed layer over the native fault engine (``csrc/engine.c``): -errno -> OSError.

Like :mod:`uffd_aio.binding.lowlevel`, this is the only place that touches
``ffi``/``lib`` for the engine; :mod:`uffd_aio.native` and the pager use
:class:`Engine`.  Every call comes from the pager's loop thread.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import attrs

from uffd_aio.binding._native import ffi, lib
from uffd_aio.binding.lowlevel import CData, check

SRC_MEMORY: int = lib.UA_SRC_MEMORY
SRC_ZERO: int = lib.UA_SRC_ZERO
SRC_FILE: int = lib.UA_SRC_FILE
MAX_WINDOW: int = lib.UA_ENGINE_MAX_WINDOW
LOG_CAP: int = lib.UA_ENGINE_LOG_CAP


@attrs.frozen
class EngineStats:
    """Counters of one engine (``struct ua_engine_stats``)."""

    native_faults: int = 0
    pages_copied: int = 0
    zero_pages: int = 0
    readahead_pages: int = 0
    wakes: int = 0
    cache_misses: int = 0
    passed_up: int = 0
    reads: int = 0
    ioctls: int = 0
    cache_reads: int = 0
    cache_read_pages: int = 0
    read_waits: int = 0
    read_passed_up: int = 0
    ring_writes: int = 0
    pwrites: int = 0
    submits: int = 0
    touches: int = 0
    touch_full: int = 0

    def __add__(self, other: EngineStats) -> EngineStats:
        return EngineStats(*(getattr(self, a.name) + getattr(other, a.name)
                             for a in attrs.fields(EngineStats)))


_STAT_FIELDS = tuple(a.name for a in attrs.fields(EngineStats))


_TOUCH = struct.Struct("=QiHH")  # struct ua_touch
assert _TOUCH.size == ffi.sizeof("struct ua_touch")


class Touch(NamedTuple):
    """One demand fault a recording region's engine took (``struct ua_touch``): the
    region id, the fault's page index in the region, the pages placed from there
    (read-ahead included; 0: placed nothing, the page was there or a READ in flight
    brings it) and whether it was a write."""

    region: int
    page: int
    pages: int
    write: bool


class Engine:
    """One ``struct ua_engine`` for the uffd ``fd`` (which must be O_NONBLOCK).

    :meth:`close` frees it; if READs are still in flight the C side keeps their
    buffers until the completions come back (or the ring is freed)."""

    __slots__ = ("_e", "_log", "_st", "fd")

    def __init__(self, fd: int) -> None:
        e = lib.ua_engine_new(fd)
        if e == ffi.NULL:
            raise MemoryError("ua_engine_new")
        self._e = e
        self._st = ffi.new("struct ua_engine_stats *")
        self._log: CData | None = None  # the touches buffer (record)
        self.fd = fd

    @property
    def closed(self) -> bool:
        return self._e is None

    def close(self) -> None:
        if self._e is not None:
            lib.ua_engine_free(self._e)
            self._e = None

    def attach(self, ring_handle: CData, writer_fd: int = -1, read_slots: int = 0,
               slot_bytes: int = 0) -> None:
        """Put the engine on a ring (``Ring.native_handle``): ``read_slots`` buffers of
        ``slot_bytes`` for io_uring READs of page-cache misses (0: pass misses up), and
        ``writer_fd`` >= 0 to resolve with io_uring WRITEs on the uffd (patched kernel)."""
        check(lib.ua_engine_attach(self._e, ring_handle, writer_fd, read_slots, slot_bytes),
              "native engine: attach to the ring")

    def set_file(self, region_id: int, fd: int, offset: int) -> None:
        """File region ``region_id`` reads its misses from ``fd`` at ``offset`` (page 0)."""
        check(lib.ua_engine_file(self._e, region_id, fd, offset),
              f"native engine: file of region {region_id}")

    def take(self, buf: int, cap: int) -> int:
        """Move the messages completions queued for Python to ``buf``; how many."""
        return check(lib.ua_engine_take(self._e, buf, cap), "native engine: take")

    def inflight(self) -> int:
        """READs / WRITEs whose completion has not come back."""
        return 0 if self._e is None else int(lib.ua_engine_inflight(self._e))

    def add(self, start: int, length: int, page_size: int, kind: int, src: int, src_len: int,
            ra_min: int, ra_max: int) -> int:
        """Serve [start, start+length) natively; returns the region id."""
        return check(lib.ua_engine_add(self._e, start, length, page_size, kind, src, src_len,
                                       ra_min, ra_max),
                     f"native engine: add {start:#x}+{length:#x}")

    def drop(self, region_id: int) -> None:
        check(lib.ua_engine_drop(self._e, region_id), f"native engine: drop {region_id}")

    def ranges(self) -> int:
        return int(lib.ua_engine_nranges(self._e))

    def run(self, buf: int, nbytes: int, cap: int, max_reads: int = 0,
            budget_ns: int = 0) -> int:
        """Serve what it can of the ``nbytes`` of uffd_msg at ``buf``; the number of
        messages left (compacted at ``buf``, in order) for Python."""
        return check(lib.ua_engine_run(self._e, buf, nbytes, cap, max_reads, budget_ns),
                     "native engine: run")

    def window(self, region_id: int, rel_page: int) -> int:
        """The read-ahead window for a fault at page ``rel_page`` (updates its state)."""
        return check(lib.ua_engine_window(self._e, region_id, rel_page),
                     f"native engine: window of region {region_id}")

    def resident(self, region_id: int, rel_page: int) -> bool:
        return bool(check(lib.ua_engine_resident(self._e, region_id, rel_page),
                          f"native engine: page {rel_page} of region {region_id}"))

    def record(self, region_id: int, on: bool = True) -> None:
        """Log region ``region_id``'s demand faults (first touches) for :meth:`touches`."""
        check(lib.ua_engine_record(self._e, region_id, int(on)),
              f"native engine: record region {region_id}")

    def touches(self) -> list[Touch]:
        """Take what the log holds, oldest first (empty when nothing records)."""
        if self._e is None:
            return []
        buf = self._log
        if buf is None:
            buf = self._log = ffi.new("struct ua_touch[]", LOG_CAP)
        out: list[Touch] = []
        while n := int(lib.ua_engine_touches(self._e, buf, LOG_CAP)):
            raw = bytes(ffi.buffer(buf, n * _TOUCH.size))
            out.extend(Touch(region, rel, pages, bool(write))
                       for rel, region, pages, write in _TOUCH.iter_unpack(raw))
        return out

    def stats(self) -> EngineStats:
        if self._e is None:
            return EngineStats()
        st = self._st
        lib.ua_engine_get_stats(self._e, st)
        return EngineStats(*(int(getattr(st, n)) for n in _STAT_FIELDS))
