"""Region: a registered range of memory and the handlers that serve it."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar, overload

import attrs

from uffd_aio.binding import lowlevel as ll
from uffd_aio.events import EventHandler
from uffd_aio.modes import Mode
from uffd_aio.ops import FaultResult

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from uffd_aio.fault import FaultHandler
    from uffd_aio.native import NativeSourceArg, Readahead
    from uffd_aio.ring import Ring
    from uffd_aio.uffd import Userfaultfd

__all__ = ["EventHandler", "FaultHandler", "FaultResult", "Region", "RegionOwner"]


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
                     record: Callable[[int, int, bool], object] | None = None) -> None: ...
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
                   record: Callable[[int, int, bool], object] | None = None) -> None:
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


def __getattr__(name: str) -> object:
    # ``FaultHandler`` lived here; it is fault.py's now (it names PageFault)
    if name == "FaultHandler":
        from uffd_aio.fault import FaultHandler

        return FaultHandler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
