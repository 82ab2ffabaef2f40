"""Thin typed layer over the test-helper extension (``uffd_aio.testing._helpers``).

The only module that touches that extension's ``ffi``/``lib``, as
:mod:`uffd_aio.binding.lowlevel` is for the product's: -errno becomes OSError,
addresses are ints.  :mod:`uffd_aio.testing` wraps these in its public API.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import TYPE_CHECKING, Protocol

from uffd_aio.binding.lowlevel import check
from uffd_aio.testing._helpers import ffi, lib

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


class U64Array(Protocol):
    """A cffi ``uint64_t[]``."""

    def __getitem__(self, index: int, /) -> int: ...
    def __setitem__(self, index: int, value: int, /) -> None: ...


class Scan(Protocol):
    """A cffi ``struct ua_scan *`` (helpers.h)."""

    addr: int
    len: int
    page_size: int
    offset: int
    seed: int
    nthreads: int
    op: int
    order: int
    rng_seed: int
    lat_ns: U64Array
    progress: int
    mismatches: int
    first_mismatch: int
    checksum: int
    wall_ns: int
    stop: int
    sigbus: int


class Stamp(Protocol):
    """A cffi ``struct ua_stamp *`` (helpers.h)."""

    addr: int
    npages: int
    page_size: int
    nthreads: int
    order: int
    passes: int
    rng_seed: int
    gen: U64Array
    progress: int
    stop: int
    wall_ns: int


def buffer_address(buf: ReadableBuffer, *, writable: bool = False) -> tuple[int, Sized]:
    """Address of a buffer-protocol object, plus the cffi handle that keeps it pinned
    (its ``len`` is the buffer's size in bytes)."""
    cbuf = ffi.from_buffer(buf, require_writable=writable)
    return int(ffi.cast("uintptr_t", cbuf)), cbuf


def pattern_word(offset: int, seed: int) -> int:
    return int(lib.ua_pattern_word(offset, seed))


def fill_pattern(addr: int, length: int, offset: int, seed: int) -> None:
    lib.ua_fill_pattern(addr, length, offset, seed)


def verify_pattern(addr: int, length: int, offset: int, seed: int) -> int:
    """-1 if [addr, addr+length) holds the pattern, else the first bad byte offset."""
    return int(lib.ua_verify_pattern(addr, length, offset, seed))


def new_scan() -> Scan:
    scan: Scan = ffi.new("struct ua_scan *")
    return scan


def new_u64_array(n: int) -> U64Array:
    arr: U64Array = ffi.new("uint64_t[]", n)
    return arr


def scan_run(scan: Scan) -> None:
    check(lib.ua_scan_run(scan), "native scan")


def fork_touch(addr: int, length: int, page_size: int, op: int, offset: int, seed: int) -> int:
    return check(lib.ua_fork_touch(addr, length, page_size, op, offset, seed), "fork")


def gettid() -> int:
    return int(lib.ua_gettid())


def malloc_churn(n: int) -> None:
    lib.ua_malloc_churn(n)


def read_catch(addr: int, length: int, page_size: int) -> tuple[bytes, list[int]]:
    """Copy [addr, addr+length) page by page, catching SIGBUS (GIL released).

    Returns the bytes (pages that raised SIGBUS read as zeros) and the indexes
    of the pages that raised SIGBUS.
    """
    npages = length // page_size
    out = bytearray(length)
    bus = ffi.new("uint8_t[]", max(npages, 1))
    dst, keep = buffer_address(out, writable=True)
    check(int(lib.ua_read_catch(addr, length, page_size, dst, bus)), "read_catch")
    del keep
    return bytes(out), [i for i in range(npages) if bus[i]]


def new_stamp() -> Stamp:
    stamp: Stamp = ffi.new("struct ua_stamp *")
    return stamp


def stamp_run(stamp: Stamp) -> None:
    check(lib.ua_stamp_run(stamp), "stamp writers")


def stamp_fill(addr: int, page_size: int, page: int, gen: int) -> None:
    lib.ua_stamp_fill(addr, page_size, page, gen)


def stamp_verify(addr: int, npages: int, page_size: int, gen: U64Array) -> tuple[int, int]:
    """(first page not holding its gen[p] stamp or -1, number of such pages)."""
    bad = ffi.new("int64_t *")
    first = int(lib.ua_stamp_verify(addr, npages, page_size, gen, bad))
    return first, int(bad[0])
