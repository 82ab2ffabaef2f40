"""Region: a registered range of memory and the handlers that serve it, and PageFault: the
event such a handler receives (the two name each other, so they share a module)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Concatenate, ParamSpec, Protocol, TypeAlias, TypeVar, overload

import attrs

from uffd_aio.binding import lowlevel as ll
from uffd_aio.dispatch import BASE_PAGE, Fault, check_move, check_range
from uffd_aio.events import EventHandler
from uffd_aio.log import get_logger
from uffd_aio.modes import Mode
from uffd_aio.ops import FaultResult, Kind, Moved, Op, zero_source

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from uffd_aio.ring import Ring
    from uffd_aio.sources import NativeSourceArg, Readahead, TouchRecorder
    from uffd_aio.uffd import Userfaultfd

__all__ = ["EventHandler", "FaultHandler", "FaultResult", "PageFault", "Region", "RegionOwner",
           "Resolution"]


class RegionOwner(Protocol):
    """What a region asks of the :class:`~uffd_aio.Pager` that owns it."""

    @property
    def closing(self) -> bool: ...
    @property
    def ring(self) -> Ring: ...
    def uffd_for(self, region: Region) -> Userfaultfd: ...
    def fault_in_flight(self, address: int) -> bool: ...
    def serve_native(self, region: Region, source: NativeSourceArg, *, offset: int,
                     readahead: Readahead,
                     record: TouchRecorder | None = None) -> None: ...
F = TypeVar("F", bound="FaultHandler")
E = TypeVar("E", bound=EventHandler)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@attrs.define(eq=False, repr=False)
class Region:
    """A registered range.  Created by :meth:`Pager.map`, :meth:`Pager.register` or
    :meth:`Pager.adopt`; not constructed directly."""

    pager: RegionOwner  # the Pager
    address: int
    length: int
    mode: Mode
    page_size: int
    name: str
    #: file offset of the region start in its backing store (handoff ``offset``)
    store_offset: int = 0
    #: the pager mmap'd it (and unmaps it on close)
    owned: bool = False
    #: memory lives in another process (handed-off uffd): we cannot read it
    remote: bool = False
    #: memfd backing shared/MINOR regions made by Pager.map(shared=True)
    memfd: int | None = None
    #: a second, unregistered mapping of ``memfd`` (to fill the page cache for MINOR)
    alias: int | None = None
    fault_handler: FaultHandler | None = None
    eager: bool | None = None
    event_handlers: list[EventHandler] = attrs.Factory(list)
    closed: bool = False

    def __repr__(self) -> str:
        return (f"Region({self.name!r}, {self.address:#x}+{self.length:#x}, mode={self.mode!s}, "
                f"page_size={self.page_size})")

    @property
    def end(self) -> int:
        return self.address + self.length

    @property
    def pages(self) -> int:
        return self.length // self.page_size

    def address_of(self, offset: int) -> int:
        if not 0 <= offset < self.length:
            raise ValueError(f"offset {offset:#x} outside {self!r}")
        return self.address + offset

    def offset_of(self, address: int) -> int:
        if not self.address <= address < self.end:
            raise ValueError(f"address {address:#x} outside {self!r}")
        return address - self.address

    # ---- handlers ------------------------------------------------------

    @overload
    def on_fault(self, fn: F, /) -> F: ...
    @overload
    def on_fault(self, fn: None = None, /, *,
                 eager: bool | None = None) -> Callable[[F], F]: ...

    def on_fault(self, fn: F | None = None, /, *,
                 eager: bool | None = None) -> F | Callable[[F], F]:
        """Set the fault handler (decorator).  ``async def`` or plain ``def``.

        ``eager`` (default: the pager's): run the handler inline until its
        first real suspension, so a handler that never suspends resolves
        without a Task.  Before that first suspension
        ``asyncio.current_task()`` is None: code that needs a task there
        (``asyncio.timeout``, some client libraries) wants ``eager=False``.
        """

        def deco(f: F) -> F:
            if not callable(f):
                raise TypeError(f"fault handler must be callable, got {f!r}")
            self.fault_handler = f
            self.eager = eager
            return f

        return deco(fn) if fn is not None else deco

    def on_event(self, fn: E) -> E:
        """Add a handler for Remap/Remove/Unmap events touching this region."""
        self.event_handlers.append(fn)
        return fn

    def serve_from(self, source: NativeSourceArg, *, offset: int = 0,
                   readahead: Readahead = None,
                   record: TouchRecorder | None = None) -> None:
        """Serve this region's MISSING faults from ``source`` in the native engine (C).

        ``source``: a buffer (bytes, bytearray, mmap, numpy...; kept alive by the
        region), a path or open file (a snapshot, mapped read-only; page-cache
        misses go to Python), or :data:`uffd_aio.ZERO`.  ``offset``: where the
        region starts in the source.  ``readahead``: None (one page), pages (int,
        fixed window), ``(min, max)`` (adaptive) or a policy from
        :mod:`uffd_aio.serving.readahead`.  Sets :meth:`on_fault` to a Python
        fallback serving the same source, for what the engine passes up (misses,
        EAGAIN retries, errors; the pager's error policy applies).  ``record``: called
        as ``record(page, pages, is_write)`` for each demand fault the engine serves on
        the region (fork children's too), in order, shortly after (after each read of
        the uffd): ``page`` is the faulting page's index in the region, ``pages`` how
        many it placed from there (read-ahead included; 0 when it placed none: the page
        was already there, or a READ in flight brings it).  Faults the engine passes up
        are not reported (they reach the region's handler).  See :mod:`uffd_aio.native`.
        """
        if self.page_size != _PAGE_SIZE:
            raise ValueError(f"serve_from: the native engine serves base pages "
                             f"({_PAGE_SIZE} bytes) only; {self!r} has "
                             f"{self.page_size >> 10} KiB pages (hugetlbfs): serve it "
                             f"with a Python handler (region.on_fault)")
        self.pager.serve_native(self, source, offset=offset, readahead=readahead,
                                record=record)

    @property
    def handler_is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fault_handler)

    # ---- memory access (never from the loop thread: see docs/gil.md) -------

    def _local(self) -> None:
        if self.remote:
            raise RuntimeError(f"{self!r} lives in another process; it cannot be read here")
        if self.closed:
            raise RuntimeError(f"{self!r} is closed")

    async def read(self, offset: int, length: int) -> bytes:
        """Read bytes from the region in a worker thread (faults are served meanwhile)."""
        self._local()
        start = self.address_of(offset)
        if offset + length > self.length:
            raise ValueError("read past the end of the region")
        return await asyncio.to_thread(ll.read_memory, start, length)

    async def write(self, offset: int, data: ReadableBuffer) -> None:
        """Write bytes into the region from a worker thread."""
        self._local()
        start = self.address_of(offset)
        if offset + len(memoryview(data).cast("B")) > self.length:
            raise ValueError("write past the end of the region")
        await asyncio.to_thread(ll.write_memory, start, data)

    def write_protect(self, offset: int = 0, length: int | None = None, *,
                      protect: bool = True) -> None:
        """Write-protect (or unprotect) present pages of a WP-registered region."""
        n = self.length - offset if length is None else length
        self.pager.uffd_for(self).writeprotect(self.address_of(offset), n, protect=protect)


# ---- the fault a handler receives --------------------------------------------------------

_P = ParamSpec("_P")


class Resolution(Coroutine[object, object, int]):
    """What the resolution methods of :class:`PageFault` return: **await it**.

    ``await ev.zero()`` resolves the fault and returns the bytes resolved.  Nothing
    happens until it is awaited (it is a coroutine: ``asyncio.create_task`` and
    ``asyncio.gather`` take it too), so a handler that writes ``ev.zero()`` without
    ``await`` resolves nothing itself; the pager's default resolution then applies
    when the handler returns.  Such a dropped resolution logs the warning
    ``uffd_aio.resolution_not_awaited`` (naming the method and the fault) when it is
    garbage-collected, which CPython does as soon as the expression is dropped.
    """

    __slots__ = ("_coro", "_fault", "_method", "_used")

    def __init__(self, coro: Coroutine[object, object, int], fault: PageFault,
                 method: str) -> None:
        self._used = False
        self._coro = coro
        self._fault = fault
        self._method = method

    def __await__(self) -> Generator[object, None, int]:
        self._used = True
        return self._coro.__await__()

    def send(self, value: object) -> object:
        self._used = True
        return self._coro.send(value)

    def throw(self, *args: object) -> object:
        self._used = True
        # forwarded as given (the 3-argument form warns on 3.12+), which no single
        # overload of Coroutine.throw types
        return self._coro.throw(*args)  # type: ignore[call-overload]

    def close(self) -> None:
        self._used = True
        self._coro.close()

    def __repr__(self) -> str:
        return f"<Resolution ev.{self._method}() of {self._fault!r}>"

    def __del__(self) -> None:
        if self._used:
            return
        try:
            self._coro.close()  # never started: no "coroutine was never awaited" on top
            get_logger(component="fault").warning(
                "uffd_aio.resolution_not_awaited", method=f"ev.{self._method}()",
                fault=repr(self._fault),
                hint=f"write `await ev.{self._method}(...)`: without await nothing is resolved")
        except Exception:  # interpreter shutdown
            pass


def _resolution(fn: Callable[Concatenate[PageFault, _P], Coroutine[object, object, int]]
                ) -> Callable[Concatenate[PageFault, _P], Resolution]:
    """Wrap a resolution coroutine method so that a dropped, un-awaited call is reported."""
    name = fn.__name__

    def method(self: PageFault, /, *args: _P.args, **kwargs: _P.kwargs) -> Resolution:
        return Resolution(fn(self, *args, **kwargs), self, name)

    functools.update_wrapper(method, fn)  # name, docstring, signature (help(), docs)
    return method


class PageFault(Fault):
    """A page fault in a registered region.

    Return ``bytes`` (copied in at :attr:`page`; may span several pages for
    read-ahead), :class:`~uffd_aio.Moved` (pages this process holds in its own
    anonymous memory, moved in without a copy) or ``None`` (zero page for
    MISSING faults, unprotect for WP faults, CONTINUE for MINOR faults) from
    the handler, or resolve explicitly with the methods below (then the
    return value is ignored).  The methods are coroutines: ``await ev.zero()``;
    one called without ``await`` does nothing and logs
    ``uffd_aio.resolution_not_awaited`` (:class:`Resolution`).

    Fields (addresses are virtual addresses in the faulting process, ints):

    * ``address``: the faulting address, as the kernel reported it;
    * ``page``: the **address** of the faulting page (``address`` rounded down to
      ``page_size``), not a page number; also :attr:`page_address`.  The page's
      index in the region is ``offset // page_size``;
    * ``offset``: ``page`` relative to the region's start (the offset in the
      region's store);
    * ``page_size``: the region's page size (4 KiB, or 2 MiB for hugetlbfs);
    * ``region``: the :class:`~uffd_aio.Region` faulted;
    * ``is_write``, ``is_wp``, ``is_minor`` (and :attr:`is_missing`): the kind of fault;
    * ``thread_id``: the faulting thread's id when ``THREAD_ID`` was negotiated.

    The same object is the pager's record of the fault while it is in flight
    (:class:`uffd_aio.dispatch.Fault`: one record per fault).
    """

    __slots__ = ()
    region: Region  # the pager's regions (the core sees them as RegionView)

    async def _run(self, op: Op) -> int:
        resolver = self.channel.resolver
        assert resolver is not None
        res = resolver.explicit(self, op)
        if isinstance(res, int):
            return res
        return await res

    @_resolution
    async def copy(self, data: ReadableBuffer, *, offset: int | None = None,
                   wp: bool = False) -> int:
        """Copy ``data`` in at region ``offset`` (default: this fault's page); returns bytes.

        ``len(data)`` must be a multiple of the page size and stay inside the
        region; it may cover several pages (read-ahead).  ``wp=True`` maps
        the pages write-protected (for dirty tracking).  The kernel copies
        fastest from a page-aligned source (an ``mmap`` buffer, a registered
        buffer); ``bytes``/``bytearray`` are never page-aligned, which costs
        about 20 % on large copies (benchmarks/README.md).
        """
        start = self.page if offset is None else self.region.address_of(offset)
        view = memoryview(data).cast("B")
        check_range(self, start, view.nbytes, what="copy")
        return await self._run(Op(Kind.COPY, start, view.nbytes, view, wp))

    @_resolution
    async def move(self, src_address: int, length: int | None = None, *,
                   offset: int | None = None, allow_src_holes: bool = False) -> int:
        """UFFDIO_MOVE (6.8+): move the pages at ``src_address`` in, zero-copy.

        ``length`` bytes (default one page) go to region ``offset`` (default:
        this fault's page).  The source must be private anonymous memory of the
        process that owns the uffd (so not a handed-over uffd's peer, not shmem
        or hugetlbfs), page-aligned, written and owned exclusively by this
        process; afterwards it is a hole.  Returns bytes moved (less than
        ``length`` only if the address space changed meanwhile: the rest stays
        at the source).  Raises :class:`~uffd_aio.errors.MoveError`: ``EBUSY``
        (shared source page, e.g. after a fork: ``MADV_DONTFORK`` the buffer),
        ``ENOENT`` (hole in the source; ``allow_src_holes=True`` skips holes),
        ``EEXIST`` (destination already there), ``EINVAL``.  The pager's
        default resolution does not run after it.  When to prefer it over
        :meth:`copy`: docs/backends.md, "MOVE".
        """
        start = self.page if offset is None else self.region.address_of(offset)
        n = self.page_size if length is None else length
        moved = Moved(src_address, n, allow_src_holes)
        check_move(self, start, n, moved)
        return await self._run(Op(Kind.MOVE, start, n, moved))

    @_resolution
    async def zero(self, length: int | None = None) -> int:
        """Map zero pages from this fault's page on (``length`` bytes, default one page)."""
        n = self.page_size if length is None else length
        check_range(self, self.page, n, what="zero")
        # hugetlbfs has no zero page: a copy from a zero buffer
        data = None if self.page_size == BASE_PAGE else zero_source(n)
        return await self._run(Op(Kind.ZERO, self.page, n, data))

    @_resolution
    async def continue_(self, length: int | None = None, *, wp: bool = False) -> int:
        """UFFDIO_CONTINUE: map the page-cache pages that are already there (MINOR faults)."""
        n = self.page_size if length is None else length
        check_range(self, self.page, n, what="continue")
        return await self._run(Op(Kind.CONTINUE, self.page, n, None, wp))

    @_resolution
    async def unprotect(self, length: int | None = None) -> int:
        """Remove write protection (WP faults) and wake the writer."""
        n = self.page_size if length is None else length
        check_range(self, self.page, n, what="unprotect")
        return await self._run(Op(Kind.UNPROTECT, self.page, n))

    @_resolution
    async def wake(self) -> int:
        """Wake the threads waiting on this page without mapping anything (UFFDIO_WAKE).

        For a fault that needs no resolution any more: the page is there already, or
        it is gone and the woken thread's retry faults again (as a MISSING fault).
        """
        return await self._run(Op(Kind.WAKE, self.page, self.page_size))

    @_resolution
    async def poison(self) -> int:
        """Make this page raise SIGBUS in the faulting thread (and on later accesses)."""
        return await self._run(Op(Kind.POISON, self.page, self.page_size))


#: a fault handler (``@region.on_fault``): takes the :class:`PageFault`, returns a
#: :data:`~uffd_aio.ops.FaultResult` or an awaitable of one
FaultHandler: TypeAlias = Callable[[PageFault], "FaultResult | Awaitable[FaultResult]"]
