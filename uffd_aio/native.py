"""Native sources: region content the C fault engine serves without Python.

``region.serve_from(source, offset=0, readahead=None)`` (see
:meth:`uffd_aio.Region.serve_from`) turns a source into a :class:`NativeSource`:

* a buffer (``bytes``, ``bytearray``, ``mmap``, a C-contiguous numpy array...):
  page ``i`` of the region is ``source[offset + i*page_size:...]``; the region
  keeps the buffer alive until it is unregistered;
* a path or an open file: a snapshot file, mapped read-only; pages in the page
  cache are copied straight from the mapping, the others (checked with
  ``mincore``, without blocking) are read by the engine with an io_uring READ
  on the pager's ring into a buffer of its own and copied when the READ
  completes, in C (``Pager(native_read_slots=0)``: they go up to Python, which
  reads them the same way);
* :data:`ZERO`: zero pages.

Whatever the engine does not serve (page-cache misses, EAGAIN while the address
space changes, errors, write-protect and minor faults) reaches the region's
``on_fault`` handler, which ``serve_from`` sets to a Python fallback serving the
same source, so the pager's error policy, timeouts and stats apply as usual.
Setting ``@region.on_fault`` afterwards replaces that fallback.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import attrs

from uffd_aio.binding import engine as _engine
from uffd_aio.binding import lowlevel as ll
from uffd_aio.log import get_logger
from uffd_aio.serving.readahead import AdaptiveWindow, FixedWindow, NoReadahead
from uffd_aio.sources import ZERO as ZERO
from uffd_aio.sources import NativeSourceArg as NativeSourceArg
from uffd_aio.sources import Readahead as Readahead
from uffd_aio.sources import TouchRecorder, ZeroSource

if TYPE_CHECKING:
    from _typeshed import HasFileno, StrPath
    from typing_extensions import TypeIs

    from uffd_aio.region import FaultHandler, PageFault
    from uffd_aio.ring import Ring


class SourceRegion(Protocol):
    """What a source reads of the :class:`~uffd_aio.Region` it serves (a protocol: this
    module sits below region.py and pager.py, which import it)."""

    @property
    def length(self) -> int: ...
    @property
    def page_size(self) -> int: ...
    @property
    def pager(self) -> _RingOwner: ...


class _RingOwner(Protocol):
    @property
    def ring(self) -> Ring: ...


class EngineOwner(Protocol):
    """A uffd context with a native engine: a fork child's (the pager's ``_Context``)."""

    engine: _engine.Engine | None


def readahead_bounds(readahead: Readahead) -> tuple[int, int]:
    """(min, max) window in pages: equal for a fixed window, min < max for adaptive.

    ``None``/:class:`NoReadahead` -> 1 page; an int N or :class:`FixedWindow` -> N;
    a ``(min, max)`` pair or :class:`AdaptiveWindow` -> adaptive (doubles on
    sequential faults up to max, back to min on random ones).
    """
    if readahead is None or isinstance(readahead, NoReadahead):
        lo = hi = 1
    elif isinstance(readahead, FixedWindow):
        lo = hi = readahead.pages
    elif isinstance(readahead, AdaptiveWindow):
        lo, hi = readahead.min_pages, readahead.max_pages
        if lo == hi:
            raise ValueError("an adaptive window needs min_pages < max_pages")
    elif isinstance(readahead, tuple):
        lo, hi = readahead
        if lo >= hi:
            raise ValueError(f"adaptive read-ahead needs min < max, not {readahead!r}")
    elif isinstance(readahead, int) and not isinstance(readahead, bool):
        lo = hi = readahead
    else:
        raise TypeError(f"readahead must be None, pages (int), (min, max) or a read-ahead "
                        f"policy, not {readahead!r}")
    if not 1 <= lo <= hi <= _engine.MAX_WINDOW:
        raise ValueError(f"read-ahead windows must be 1..{_engine.MAX_WINDOW} pages, "
                         f"not {readahead!r}")
    return lo, hi


@attrs.define(eq=False)
class NativeSource:
    """What the engine copies from for one region, and the Python fallback for the rest."""

    kind: int
    src: int
    src_len: int
    description: str
    fallback: FaultHandler
    keep: object = None  # pins a buffer for as long as the engine may copy from it
    mapping: tuple[int, int] | None = None  # our read-only file mapping (addr, len)
    fd: int | None = None  # our file descriptor (file source)
    file_offset: int = 0  # file offset of the region's first page (file source)
    ra: tuple[int, int] = (1, 1)
    #: fork children's engines serving pieces of the region from this source: (context, id)
    forks: list[tuple[EngineOwner, int]] = attrs.field(factory=list)
    drain: Callable[[], None] | None = None  # the ring's schedule_drain (Pager._follow_fork)
    #: serve_from(record=...): told (page index in the region, pages placed, is write) of
    #: each demand fault the engine serves on the region (fork children's included)
    record: TouchRecorder | None = None

    def add_to(self, engine: _engine.Engine, start: int, length: int, page_size: int,
               region_offset: int) -> int:
        """Serve [start, start+length), region offset ``region_offset`` on, from this
        source in ``engine``; returns the engine's region id."""
        src = self.src + region_offset if self.kind != _engine.SRC_ZERO else 0
        src_len = max(self.src_len - region_offset, 0) if self.kind != _engine.SRC_ZERO else 0
        rid: int = engine.add(start, length, page_size, self.kind, src, src_len, *self.ra)
        if self.fd is not None:
            try:
                engine.set_file(rid, self.fd, self.file_offset + region_offset)
            except BaseException:
                engine.drop(rid)
                raise
        return rid

    def close(self) -> None:
        """Release the mapping and the file; the engine must have dropped the region
        (the engines of fork children are dropped from here: they copy from the same
        source and read the same file)."""
        forks, self.forks = self.forks, []
        waited = False
        for ctx, rid in forks:
            engine = ctx.engine
            if engine is not None and not engine.closed:
                waited = waited or engine.inflight() > 0
                try:
                    engine.drop(rid)  # waits for the WRITEs that read the source
                except OSError:
                    pass
        if waited and self.drain is not None:
            self.drain()  # what those waits reaped, to its owners
        if self.mapping is not None:
            addr, length = self.mapping
            self.mapping = None
            try:
                ll.munmap(addr, length)
            except OSError:
                pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.keep = None


def make_source(region: SourceRegion, source: NativeSourceArg, *, offset: int = 0,
                readahead: Readahead = None) -> NativeSource:
    """Check ``source`` against ``region`` and build its :class:`NativeSource`.

    Raises ValueError/TypeError/OSError with what is wrong (too short, unaligned...).
    """
    ra = readahead_bounds(readahead)
    length = region.length
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, not {offset!r}")
    if isinstance(source, ZeroSource):  # ZERO (the only one)
        if offset:
            raise ValueError("the zero source takes no offset")
        return NativeSource(_engine.SRC_ZERO, 0, 0, "zero", _zero_fallback, ra=ra)
    if _is_file(source):
        return _file_source(region, source, offset, ra)
    try:
        view = memoryview(source).cast("B")
    except TypeError:
        raise TypeError(f"serve_from: {type(source).__name__} is not a buffer, a path, an "
                        "open file or uffd_aio.ZERO") from None
    if offset + length > view.nbytes:
        raise ValueError(f"serve_from: the buffer has {view.nbytes} bytes; the region needs "
                         f"{length} from offset {offset} ({offset + length - view.nbytes} "
                         "missing)")
    addr, keep = ll.buffer_address(view)
    src = addr + offset
    page = view[offset:offset + length]

    def memory_fallback(ev: PageFault) -> memoryview:
        return page[ev.offset:ev.offset + ev.page_size]

    return NativeSource(_engine.SRC_MEMORY, src, length, f"memory({view.nbytes} bytes)",
                        memory_fallback, keep=(keep, view), ra=ra)


def _zero_fallback(ev: PageFault) -> None:
    return None


def _is_file(source: NativeSourceArg) -> TypeIs[StrPath | HasFileno]:
    """A path or an open file (else a buffer)."""
    return isinstance(source, (str, os.PathLike)) or hasattr(source, "fileno")


def _file_source(region: SourceRegion, source: StrPath | HasFileno, offset: int,
                 ra: tuple[int, int]) -> NativeSource:
    ps = region.page_size
    if offset % ps:
        raise ValueError(f"serve_from: a file offset must be a multiple of the page size {ps}, "
                         f"not {offset}")
    if hasattr(source, "fileno"):
        fd = os.dup(source.fileno())
        name = getattr(source, "name", f"fd {source.fileno()}")
    else:
        name = os.fspath(source)
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"serve_from: {name!r} is not a regular file")
        if offset + region.length > st.st_size:
            raise ValueError(f"serve_from: {name!r} has {st.st_size} bytes; the region needs "
                             f"{region.length} from offset {offset}")
        if st.st_uid != os.geteuid() and not os.access(f"/proc/self/fd/{fd}", os.W_OK):
            # mincore() only reports the page cache of files one owns or may write
            # (Linux 5.0+); for others it says "resident", and a page-cache miss is then
            # read synchronously by the COPY on the loop thread
            get_logger(component="native").warning(
                "uffd_aio.native_file_mincore_blind", path=str(name),
                hint="own the file or open it writable: page-cache misses would block the "
                     "loop")
        maplen = offset + region.length
        base = ll.mmap(maplen, prot=ll.PROT_READ, flags=ll.MAP_SHARED, fd=fd)
    except BaseException:
        os.close(fd)
        raise
    pager = region.pager

    async def file_fallback(ev: PageFault) -> bytearray:
        off = offset + ev.offset
        n = ev.page_size
        size = os.fstat(fd).st_size
        if off + n > size:  # truncated under us: the policy decides (poison: SIGBUS)
            raise OSError(errno.ENXIO, f"{name!r} was truncated to {size} bytes; page at "
                                       f"{off:#x} is gone")
        out = bytearray(n)
        got = await pager.ring.read(fd, out, off)
        if got != n:
            raise OSError(errno.EIO, f"short read of {name!r} at {off:#x}: {got} of {n}")
        return out

    return NativeSource(_engine.SRC_FILE, base + offset, region.length, f"file({name})",
                        file_fallback, mapping=(base, maplen), fd=fd, file_offset=offset, ra=ra)
