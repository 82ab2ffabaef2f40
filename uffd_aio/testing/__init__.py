"""GIL-free memory helpers for tests, examples and benchmarks.

Touching registered memory from a Python thread that holds the GIL
deadlocks an in-process pager; these helpers do the touching in native
threads (the GIL is released for the whole call).  Await the async ones
from the loop: they run in a worker thread while the pager serves faults.

The deterministic content ("pattern") is the benchmarks' (benchmarks/README.md):
the 8-byte little-endian word at store offset ``o`` is
``((o // 8) * 0x9E3779B97F4A7C15 mod 2**64) ^ seed``.

The native code is its own cffi extension, ``uffd_aio.testing._helpers``
(``csrc/helpers.c``, wrapped by :mod:`uffd_aio.testing._lowlevel`), not part of
the product's ``uffd_aio.binding._native``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import Literal, TextIO

import attrs

from uffd_aio.binding import lowlevel as ring_ll
from uffd_aio.testing import _lowlevel as ll

DEFAULT_SEED = 0x5546464441494F21  # "UFFDAIO!"
Op = Literal["read", "write", "verify", "write-word"]
Order = Literal["seq", "random"]
_OPS = {"read": 0, "write": 1, "verify": 2, "write-word": 3}
_ORDERS = {"seq": 0, "random": 1}


def pattern_word(offset: int, seed: int = DEFAULT_SEED) -> int:
    """The pattern's word at store ``offset`` (a multiple of 8)."""
    return ll.pattern_word(offset, seed)


def pattern_bytes(offset: int, length: int, seed: int = DEFAULT_SEED) -> bytearray:
    """``length`` bytes of pattern starting at store ``offset`` (both multiples of 8)."""
    if offset % 8 or length % 8:
        raise ValueError("offset and length must be multiples of 8")
    out = bytearray(length)
    addr, keep = ll.buffer_address(out, writable=True)
    ll.fill_pattern(addr, length, offset, seed)
    del keep
    return out


def pattern_into(buf: bytearray | memoryview, offset: int, seed: int = DEFAULT_SEED) -> None:
    """Fill a writable buffer with the pattern of store ``offset``."""
    addr, keep = ll.buffer_address(buf, writable=True)
    ll.fill_pattern(addr, len(keep), offset, seed)


def fill_sync(address: int, length: int, offset: int = 0, seed: int = DEFAULT_SEED) -> None:
    """Write the pattern of store ``offset`` into [address, address+length); releases the GIL.

    For memory the caller owns (a staging buffer, a region's alias), or a
    registered range from a thread other than the loop's (as :func:`verify_sync`).
    """
    ll.fill_pattern(address, length, offset, seed)


def verify_sync(address: int, length: int, offset: int = 0, seed: int = DEFAULT_SEED) -> int:
    """-1 if memory holds the pattern, else the first bad byte's offset; releases the GIL.

    Blocks the calling thread on faults: never call it on the loop thread of
    the pager serving that memory (use :func:`verify`).
    """
    return ll.verify_pattern(address, length, offset, seed)


async def verify(address: int, length: int, offset: int = 0, seed: int = DEFAULT_SEED) -> int:
    return await asyncio.to_thread(ll.verify_pattern, address, length, offset, seed)


async def read(address: int, length: int) -> bytes:
    """Copy memory out from a worker thread."""
    return await asyncio.to_thread(ring_ll.read_memory, address, length)


@attrs.frozen
class ScanResult:
    pages: int
    threads: int
    wall_s: float
    mismatches: int
    first_mismatch: int | None
    latencies_ns: list[int] | None
    #: pages whose access raised SIGBUS (poisoned: the pager's error policy); they
    #: count as mismatches too, and no longer kill the process
    sigbus: int = 0

    @property
    def mib_per_s(self) -> float:
        if not self.wall_s:
            return 0.0
        return self.pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20) / self.wall_s


async def scan(
    address: int,
    length: int,
    *,
    threads: int = 1,
    op: Op = "read",
    order: Order = "seq",
    offset: int = 0,
    seed: int = DEFAULT_SEED,
    page_size: int | None = None,
    latencies: bool = False,
    rng_seed: int = 1,
    progress: Callable[[int, int], None] | None = None,
    progress_interval: float = 0.25,
) -> ScanResult:
    """Touch every page of [address, address+length) from ``threads`` native threads.

    ``op``: read one word, write the pattern, verify the pattern, or write
    one word.  ``progress(done_pages, total_pages)`` is called from the loop
    while the threads run.
    """
    ps = page_size or os.sysconf("SC_PAGE_SIZE")
    if length % ps:
        raise ValueError(f"length {length} is not a multiple of the page size {ps}")
    s = ll.new_scan()
    npages = length // ps
    lat = ll.new_u64_array(npages) if latencies else None
    s.addr, s.len, s.page_size, s.offset, s.seed = address, length, ps, offset, seed
    s.nthreads, s.op, s.order, s.rng_seed = threads, _OPS[op], _ORDERS[order], rng_seed
    if lat is not None:
        s.lat_ns = lat
    fut = asyncio.ensure_future(asyncio.to_thread(ll.scan_run, s))
    try:
        if progress is not None:
            while not fut.done():
                await asyncio.wait([fut], timeout=progress_interval)
                progress(int(s.progress), npages)
        await fut
    except BaseException:
        s.stop = 1  # ask the threads to stop at the next page
        raise
    first = int(s.first_mismatch)
    return ScanResult(
        pages=npages,
        threads=threads,
        wall_s=s.wall_ns / 1e9,
        mismatches=int(s.mismatches),
        first_mismatch=None if first < 0 else first,
        latencies_ns=[int(lat[i]) for i in range(npages)] if lat is not None else None,
        sigbus=int(s.sigbus),
    )


async def fork_touch(address: int, length: int, *, op: Op = "verify", offset: int = 0,
                     seed: int = DEFAULT_SEED, page_size: int | None = None) -> int:
    """fork() a child that touches the range natively and exits (0 ok, 1 mismatch); its pid.

    The fork runs in a worker thread: with UFFD_FEATURE_EVENT_FORK the kernel
    holds fork() until the pager has read the FORK event, so forking on the
    loop thread that runs the pager would deadlock.  It uses ``_Fork()``, not
    glibc's ``fork()``, which would hold malloc's locks through that wait while
    the loop thread may need them (docs/gil.md, "fork").
    """
    ps = page_size or os.sysconf("SC_PAGE_SIZE")
    return await asyncio.to_thread(ll.fork_touch, address, length, ps, _OPS[op], offset, seed)


async def wait_child(pid: int) -> int:
    """Wait for a child without blocking the loop; returns the raw wait status."""
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    return status


def progress_printer(label: str, *, page_size: int | None = None, out: TextIO | None = None,
                     width: int = 22) -> Callable[[int, int], None]:
    """A ``progress(done_pages, total_pages)`` callback for :func:`scan` that draws a bar.

    On a terminal the bar is redrawn in place; otherwise (CI logs) it prints a
    line a second.
    """
    stream = out if out is not None else sys.stdout
    ps = page_size or os.sysconf("SC_PAGE_SIZE")
    tty = stream.isatty()
    t0 = time.perf_counter()
    last = [0.0, -1.0]  # time and pages of the last line

    def show(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == last[1] or (not tty and done < total and now - last[0] < 1.0):
            return
        last[0], last[1] = now, done
        pct = 100 * done // total if total else 100
        bar = "#" * (pct // 4) + "." * (25 - pct // 4)
        rate = done * ps / (1 << 20) / max(now - t0, 1e-9)
        line = f"  {label:<{width}} [{bar}] {pct:3d}%  {rate:8.1f} MiB/s"
        stream.write("\r" + line if tty else line + "\n")
        if tty and done >= total:
            stream.write("\n")
        stream.flush()

    return show


@attrs.frozen
class CaughtRead:
    """What :func:`read_catching` saw: the bytes, and the pages that raised SIGBUS."""

    data: bytes
    #: indexes (in pages from ``address``) of the pages whose access raised SIGBUS;
    #: their bytes in ``data`` are zeros
    sigbus: list[int]


def read_catching_sync(address: int, length: int, page_size: int | None = None) -> CaughtRead:
    """Copy memory out page by page in the calling thread (GIL released), catching SIGBUS.

    A poisoned page (``on_error="poison"``) does not kill the process: it is
    reported in ``sigbus``.  Never call it on the loop thread of the pager that
    serves the memory (use :func:`read_catching`).
    """
    ps = page_size or os.sysconf("SC_PAGE_SIZE")
    if length % ps:
        raise ValueError(f"length {length} is not a multiple of the page size {ps}")
    data, bus = ll.read_catch(address, length, ps)
    return CaughtRead(data, bus)


async def read_catching(address: int, length: int, page_size: int | None = None) -> CaughtRead:
    """:func:`read_catching_sync` in a worker thread."""
    return await asyncio.to_thread(read_catching_sync, address, length, page_size)


def stamp_page(page: int, gen: int, page_size: int | None = None) -> bytes:
    """The content the stamp writers put in page ``page`` at generation ``gen``."""
    ps = page_size or os.sysconf("SC_PAGE_SIZE")
    out = bytearray(ps)
    addr, keep = ll.buffer_address(out, writable=True)
    ll.stamp_fill(addr, ps, page, gen)
    del keep
    return bytes(out)


@attrs.define(eq=False)
class StampRun:
    """Native writer threads that stamp whole pages with generation numbers.

    Page ``p`` belongs to writer ``p % threads``, which writes it ``passes``
    times (generations 1, 2, ...; ``order``: "seq", "random" or "mixed", which
    alternates); ``gen(p)`` is the last generation written.  :meth:`verify`
    then reads every page back (natively) and counts the pages that do not
    hold their last stamp: a lost write shows up as an older generation.
    Generation 0 is the initial content (:func:`stamp_page` with ``gen=0``).
    """

    address: int
    npages: int
    threads: int = 2
    passes: int = 4
    order: Literal["seq", "random", "mixed"] = "mixed"
    rng_seed: int = 1
    page_size: int = attrs.field(factory=lambda: os.sysconf("SC_PAGE_SIZE"))
    _s: ll.Stamp = attrs.field(init=False)
    _gen: ll.U64Array = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        s = ll.new_stamp()
        self._gen = ll.new_u64_array(max(self.npages, 1))
        s.addr, s.npages, s.page_size = self.address, self.npages, self.page_size
        s.nthreads, s.passes, s.rng_seed = self.threads, self.passes, self.rng_seed
        s.order = {"seq": 0, "random": 1, "mixed": 2}[self.order]
        s.gen = self._gen
        self._s = s

    async def run(self) -> None:
        """Run the writers (in a worker thread); cancelling asks them to stop."""
        try:
            await asyncio.to_thread(ll.stamp_run, self._s)
        except BaseException:
            self._s.stop = 1
            raise

    def stop(self) -> None:
        self._s.stop = 1

    def gen(self, page: int) -> int:
        return int(self._gen[page])

    async def verify(self) -> tuple[int, int]:
        """(first page not holding its last stamp or -1, number of such pages)."""
        return await asyncio.to_thread(ll.stamp_verify, self.address, self.npages,
                                       self.page_size, self._gen)


def malloc_churn(n: int) -> None:
    """``n`` native malloc/free pairs past glibc's per-thread cache (each takes an arena
    lock): a loop thread that allocates while another thread forks."""
    ll.malloc_churn(n)
