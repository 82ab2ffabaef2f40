"""Serve a region's faults from a :class:`~uffd_aio.stores.base.PageStore`.

``attach(region, backend)`` installs the region's fault handler and returns an
:class:`Attachment` (stats, ``aclose()``).  What one fault does:

1. A MISSING fault at region page ``p`` asks the read-ahead policy for a
   window, clipped to the region and to the run of pages that are neither
   present nor already being fetched; the window's pages are marked
   *in flight*.
2. ``backend.fetch(store_offset + p * page_size, window)`` -- bytes, or None
   for zeros.
3. One ``await ev.copy(data)`` spanning the whole window (``ev.zero`` for None;
   with dirty tracking, a copy with ``wp=True``; a write fault's own page is
   mapped writable and marked dirty at once).  Pages that another thread
   got in first are skipped by the uffd layer (EEXIST).
4. A fault on a page that is in flight (another fault's window, or a
   replay prefetch) waits for that fetch instead of fetching again (a
   *read-ahead hit*), then resolves its page from the same data.

``Remove`` (MADV_DONTNEED / balloon) and ``Unmap`` events drop the state of
their range: those pages fault again and are fetched again.

Optional parts: ``dirty=`` (:mod:`uffd_aio.serving.dirty`: write tracking
and eviction under a budget), ``recorder=`` (record the order of first
faults to a file), ``replay=`` (prefetch a recorded order in the
background while real faults keep priority), ``zero_removed=`` (ranges the
client discarded read as zeros from then on: ``uffd-aio serve --remove
zero``) and ``observe=`` (told of every MISSING fault before it is served:
working-set recording).

Offsets: region page ``p`` is store offset ``store_offset + p * page_size``
(``store_offset`` defaults to ``region.store_offset``, the handoff
``offset``); traces record store page indexes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Awaitable, Callable, Container, Coroutine, Sequence
from typing import TYPE_CHECKING, Protocol, cast

import attrs

from uffd_aio.binding import lowlevel as ll
from uffd_aio.errors import PagerClosed
from uffd_aio.events import Remove, Unmap
from uffd_aio.log import get_logger
from uffd_aio.modes import Mode
from uffd_aio.serving.readahead import (
    FaultRecorder,
    ReadaheadPolicy,
    ReplayPlan,
    policy_from,
    read_trace,
)
from uffd_aio.stores.base import BackendError, Buffer, PageStore
from uffd_aio.uffd import MmChanging, RangeGone, retry_while_mm_changing

if TYPE_CHECKING:
    from uffd_aio.region import PageFault, Region
    from uffd_aio.uffd import Userfaultfd

__all__ = ["AttachStats", "Attachment", "DirtyPolicy", "attach"]

_Fetched = tuple[int, Buffer | None]  # (first region page of the fetch, data or None = zeros)


class DirtyPolicy(Protocol):
    """What :class:`Attachment` needs from a dirty tracker (see :mod:`.dirty`)."""

    def bind(self, att: Attachment) -> None:
        """Called once by :func:`attach` (before any fault is served)."""
        ...

    def evicting(self, page: int) -> Awaitable[None] | None:
        """An awaitable while region page ``page`` is being evicted, else None."""
        ...

    def is_evicting(self, page: int) -> bool:
        """Region page ``page`` is being evicted (read-ahead and replay leave it alone)."""
        ...

    async def on_wp_fault(self, ev: PageFault, page: int) -> None:
        """A write hit a write-protected page: record it and unprotect."""
        ...

    def resident(self, first: int, count: int, written: int | None) -> None:
        """Pages [first, first+count) were mapped; ``written`` was mapped writable (dirty)."""
        ...

    def forget(self, first: int, end: int) -> None:
        """Pages [first, end) are gone (Remove/Unmap): drop their state."""
        ...

    async def aclose(self) -> None: ...


@attrs.frozen
class AttachStats:
    """A snapshot of an :class:`Attachment`'s counters."""

    #: faults that fetched (each one backend.fetch call)
    fetches: int
    #: pages those fetches covered (faulting pages + read-ahead)
    pages_fetched: int
    bytes_fetched: int
    #: fetches that came back as zeros (None)
    zero_fetches: int
    #: pages fetched speculatively (beyond the faulting page)
    readahead_pages: int
    #: faults on a page that was already being fetched (another fault's window
    #: or a replay prefetch): they waited for that fetch instead of fetching
    readahead_hits: int
    #: faults on a page this attachment had already mapped (raced by a copy, or
    #: dropped behind its back): fetched again
    refetches: int
    #: write-protect faults (dirty tracking)
    wp_faults: int
    #: replay prefetches (backend.fetch calls) and the pages they mapped
    prefetches: int
    prefetched_pages: int
    #: failed fetches (the pager's error policy applied, or a waiter retried)
    fetch_errors: int
    #: pages currently mapped by this attachment (as far as it knows)
    present_pages: int
    #: dirty tracking and eviction (zeros without ``dirty=``)
    dirty_pages: int = 0
    evicted_pages: int = 0
    written_back_pages: int = 0
    resident_bytes: int = 0


@attrs.define(eq=False)
class _Counters:
    fetches: int = 0
    pages_fetched: int = 0
    bytes_fetched: int = 0
    zero_fetches: int = 0
    readahead_pages: int = 0
    readahead_hits: int = 0
    refetches: int = 0
    wp_faults: int = 0
    prefetches: int = 0
    prefetched_pages: int = 0
    fetch_errors: int = 0


class Attachment:
    """A region served from a backend.  Made by :func:`attach`."""

    def __init__(
        self,
        region: Region,
        backend: PageStore,
        *,
        store_offset: int,
        readahead: ReadaheadPolicy,
        dirty: DirtyPolicy | None,
        recorder: FaultRecorder | None,
        replay: Sequence[int] | None,
        replay_concurrency: int,
        replay_batch: int,
        replay_max_wait: float = 0.005,
        zero_removed: Container[int] | None = None,
        observe: Callable[[int, bool], object] | None = None,
    ) -> None:
        ps = region.page_size
        if store_offset % ps:
            raise ValueError(f"store offset {store_offset:#x} is not a multiple of the page "
                             f"size {ps:#x}")
        if dirty is not None and not region.mode & Mode.WP:
            raise ValueError(f"dirty tracking needs a region registered with Mode.WP; "
                             f"{region!r} is {region.mode!s}")
        if replay_concurrency < 1:
            raise ValueError("replay_concurrency must be >= 1")
        self.region = region
        self.backend = backend
        self.store_offset = store_offset
        self.page_size = ps
        self.npages = region.length // ps
        self.readahead = readahead
        self.dirty = dirty
        self.recorder = recorder
        self._store_page0 = store_offset // ps
        self._wp = dirty is not None
        self._present = bytearray(self.npages)
        self._present_count = 0
        self._pending: dict[int, asyncio.Future[_Fetched]] = {}
        #: in-flight fetches that a fault is waiting for (prefetches stop yielding)
        self._wanted: set[asyncio.Future[_Fetched]] = set()
        self._c = _Counters()
        self._fault_fetches = 0  # fault-path fetches in flight (replay yields to them)
        #: set (and replaced) when fault fetches drop to zero or a fault starts waiting
        #: for a prefetch: yielding prefetches re-check then
        self._changed = asyncio.Event()
        self._yielding = 0
        self._zeros = b""
        self._closed = False
        self._replay_task: asyncio.Task[None] | None = None
        self._replay_tasks: set[asyncio.Task[None]] = set()
        self._log = get_logger(
            component="attach", region=region.name, backend=backend.name)
        if replay is not None:
            lo = self._store_page0
            self._plan: ReplayPlan | None = ReplayPlan(replay, batch=replay_batch, lo=lo,
                                                       hi=lo + self.npages)
        else:
            self._plan = None
        self._replay_concurrency = replay_concurrency
        self._replay_max_wait = replay_max_wait
        self._zero_removed = zero_removed
        self._observe = observe

    # ---- public ------------------------------------------------------------

    @property
    def stats(self) -> AttachStats:
        c = self._c
        extra: dict[str, int] = {}
        d = self.dirty
        if d is not None:
            for name in ("dirty_pages", "evicted_pages", "written_back_pages", "resident_bytes"):
                extra[name] = int(getattr(d, name, 0))
        return AttachStats(
            fetches=c.fetches, pages_fetched=c.pages_fetched, bytes_fetched=c.bytes_fetched,
            zero_fetches=c.zero_fetches, readahead_pages=c.readahead_pages,
            readahead_hits=c.readahead_hits, refetches=c.refetches, wp_faults=c.wp_faults,
            prefetches=c.prefetches, prefetched_pages=c.prefetched_pages,
            fetch_errors=c.fetch_errors, present_pages=self._present_count, **extra)

    @property
    def replay_done(self) -> bool:
        """True when there is no replay, or it has prefetched the whole trace."""
        t = self._replay_task
        return t is None or t.done()

    async def wait_replayed(self) -> None:
        """Wait for the background replay to finish (no-op without one)."""
        if self._replay_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._replay_task)

    def is_present(self, page: int) -> bool:
        return bool(self._present[page])

    def is_pending(self, page: int) -> bool:
        return page in self._pending

    def store_page(self, page: int) -> int:
        """The store page index of region page ``page``."""
        return self._store_page0 + page

    def uffd(self) -> Userfaultfd:
        return self.region.pager.uffd_for(self.region)

    async def aclose(self) -> None:
        """Stop the replay and the dirty tracker, save the recording; the region keeps its
        handler (faults after this still fetch: detach by closing the region or pager)."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._replay_task, *self._replay_tasks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.dirty is not None:
            await self.dirty.aclose()
        if self.recorder is not None and self.recorder.path is not None:
            try:
                self.recorder.save()
                self._log.info("uffd_aio.trace_saved", path=os.fspath(self.recorder.path),
                               pages=len(self.recorder))
            except OSError as exc:
                self._log.error("uffd_aio.trace_save_failed", error=str(exc))

    async def __aenter__(self) -> Attachment:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- state shared with the dirty tracker --------------------------------

    def _mark_present(self, first: int, count: int) -> None:
        """Pages [first, first+count) are resident."""
        p = self._present
        end = first + count
        if count == 1:
            if not p[first]:
                p[first] = 1
                self._present_count += 1
            return
        self._present_count += count - p.count(1, first, end)
        p[first:end] = b"\x01" * count

    def _mark_absent(self, first: int, end: int) -> None:
        """Pages [first, end) are not resident any more (fetched again on the next fault)."""
        p = self._present
        first, end = max(first, 0), min(end, self.npages)
        if first >= end:
            return
        self._present_count -= p.count(1, first, end)
        p[first:end] = bytes(end - first)

    #: the dirty tracker's surface (serving/dirty.py): it re-maps and evicts pages
    mark_present = _mark_present
    mark_absent = _mark_absent

    def _zero_buffer(self, n: int) -> bytes:
        if len(self._zeros) < n:
            self._zeros = bytes(n)
        return self._zeros[:n] if len(self._zeros) != n else self._zeros

    # ---- the fault handler ----------------------------------------------------

    @property
    def handler(self) -> Callable[[PageFault], Coroutine[object, object, None] | None]:
        """The region's fault handler: :meth:`on_fault`, behind :meth:`_screen` when
        ``zero_removed`` or ``observe`` is set."""
        if self._zero_removed is None and self._observe is None:
            return self.on_fault
        return self._screen

    def _screen(self, ev: PageFault) -> Coroutine[object, object, None] | None:
        """A fault on a removed page (``zero_removed``) gets the default resolution at once
        (a zero page for MISSING, no fetch); ``observe`` is told of the other MISSING
        faults (store page, is write) before :meth:`on_fault` serves them.  A plain
        function: nothing is awaited for a removed page."""
        removed = self._zero_removed
        if removed is not None and ev.page in removed:
            return None  # the client discarded this memory
        if self._observe is not None and not ev.is_wp and not ev.is_minor:
            self._observe(self._store_page0 + ev.offset // self.page_size, ev.is_write)
        return self.on_fault(ev)

    async def on_fault(self, ev: PageFault) -> None:
        page = ev.offset // self.page_size
        if ev.is_wp:
            self._c.wp_faults += 1
            if self.dirty is None:
                await ev.unprotect()
            else:
                await self.dirty.on_wp_fault(ev, page)
            return
        if ev.is_minor:  # not ours to serve: map what the page cache has
            await ev.continue_()
            return
        if self.dirty is not None:
            waiting = self.dirty.evicting(page)
            if waiting is not None:
                await waiting
        fut = self._pending.get(page)
        if fut is not None:
            self._c.readahead_hits += 1
            if fut not in self._wanted:
                self._wanted.add(fut)
                self._notify()
            try:
                first, data = await asyncio.shield(fut)
            except Exception:  # that fetch failed or was cancelled: fetch ourselves
                pass
            else:
                await self._install_one(ev, page, first, data)
                return
        await self._fetch_and_install(ev, page)

    async def _install_one(self, ev: PageFault, page: int, first: int,
                           data: Buffer | None) -> None:
        """Resolve this fault's page from another fetch's data (usually EEXIST: already in)."""
        ps = self.page_size
        if data is None:
            chunk: Buffer | None = None
        else:
            off = (page - first) * ps
            chunk = memoryview(data).cast("B")[off:off + ps]
        await self._resolve(ev, page, 1, chunk)

    def _window(self, page: int) -> int:
        want = max(1, int(self.readahead.window(page)))
        end = min(page + want, self.npages)
        present, pending = self._present, self._pending
        j = page + 1
        d = self.dirty
        while j < end and not present[j] and j not in pending and (
                d is None or not d.is_evicting(j)):
            j += 1
        return j - page

    async def _fetch_and_install(self, ev: PageFault, page: int) -> None:
        c = self._c
        if self._present[page]:
            c.refetches += 1
            n = 1
        else:
            n = self._window(page)
        ps = self.page_size
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_Fetched] = loop.create_future()
        pending = self._pending
        for i in range(page, page + n):
            pending.setdefault(i, fut)
        self._fault_fetches += 1
        c.fetches += 1
        c.pages_fetched += n
        c.bytes_fetched += n * ps
        c.readahead_pages += n - 1
        if self.recorder is not None:
            self.recorder.record_range(self._store_page0 + page, n)
        try:
            try:
                data = await self.backend.fetch(self.store_offset + page * ps, n * ps)
            finally:
                self._fault_fetches -= 1
                if not self._fault_fetches:
                    self._notify()
            if data is None:
                c.zero_fetches += 1
            elif len(data) != n * ps:
                raise BackendError(f"{self.backend.name} returned {len(data)} bytes for a "
                                   f"{n * ps}-byte fetch at {self.store_offset + page * ps:#x}")
            await self._resolve(ev, page, n, data)
        except BaseException as exc:
            c.fetch_errors += 1
            self._release(page, n, fut)
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else
                                  PagerClosed("fetch cancelled"))
                fut.exception()  # waiters retry; never "exception was never retrieved"
            raise
        self._release(page, n, fut)
        fut.set_result((page, data))

    def _release(self, page: int, n: int, fut: asyncio.Future[_Fetched]) -> None:
        self._wanted.discard(fut)
        pending = self._pending
        for i in range(page, page + n):
            if pending.get(i) is fut:
                del pending[i]

    async def _resolve(self, ev: PageFault, page: int, n: int, data: Buffer | None) -> None:
        """Map ``n`` pages from ``page`` for fault ``ev`` (whose page is ``page``... or inside)."""
        ps = self.page_size
        fault_page = ev.offset // ps
        if not self._wp:
            if data is None:
                # ev.zero starts at the fault's page: our windows always do too
                await ev.zero(n * ps)
            else:
                await ev.copy(data, offset=page * ps)
            self._mark_present(page, n)
            return
        view = memoryview(data if data is not None else self._zero_buffer(n * ps)).cast("B")
        written: int | None = None
        if ev.is_write and page <= fault_page < page + n:
            # the writer's own page goes in writable and dirty: no second (WP) fault
            k = fault_page - page
            await ev.copy(view[k * ps:(k + 1) * ps], offset=fault_page * ps, wp=False)
            written = fault_page
            if k:
                await ev.copy(view[:k * ps], offset=page * ps, wp=True)
            if k + 1 < n:
                await ev.copy(view[(k + 1) * ps:], offset=(fault_page + 1) * ps, wp=True)
        else:
            await ev.copy(view, offset=page * ps, wp=True)
        self._mark_present(page, n)
        assert self.dirty is not None
        self.dirty.resident(page, n, written)

    # ---- other events ------------------------------------------------------------

    def on_event(self, msg: object) -> None:
        if isinstance(msg, (Remove, Unmap)):
            r = self.region
            start, end = max(msg.start, r.address), min(msg.end, r.end)
            if start >= end:
                return
            ps = self.page_size
            first = (start - r.address) // ps
            last = (end - r.address + ps - 1) // ps
            self._mark_absent(first, last)
            if self.dirty is not None:
                self.dirty.forget(first, last)
            self._log.debug("uffd_aio.range_forgotten", kind=type(msg).__name__,
                            first_page=first, end_page=last)

    # ---- replay (background prefetch of a recorded order) ------------------------

    def _start_replay(self) -> None:
        if self._plan is None:
            return
        self._replay_task = asyncio.get_running_loop().create_task(self._replay())

    def _skip(self, store_page: int) -> bool:
        p = store_page - self._store_page0
        return bool(self._present[p]) or p in self._pending or (
            self.dirty is not None and self.dirty.is_evicting(p))

    async def _replay(self) -> None:
        plan = self._plan
        assert plan is not None
        sem = asyncio.Semaphore(self._replay_concurrency)
        self._log.info("uffd_aio.replay_started", pages=len(plan.order))
        try:
            while not self._closed:
                await sem.acquire()
                nxt = plan.next_batch(self._skip)
                if nxt is None:
                    sem.release()
                    break
                first, n = nxt[0] - self._store_page0, nxt[1]
                # in flight from now on: a fault's window computed before the task runs
                # must not fetch these pages too
                fut: asyncio.Future[_Fetched] = asyncio.get_running_loop().create_future()
                for i in range(first, first + n):
                    self._pending.setdefault(i, fut)
                task = asyncio.get_running_loop().create_task(self._prefetch(first, n, fut))
                task.add_done_callback(functools.partial(self._orphan, first, n, fut))
                self._replay_tasks.add(task)
                task.add_done_callback(self._replay_tasks.discard)
                task.add_done_callback(lambda _t: sem.release())
            for _ in range(self._replay_concurrency):  # wait for the last prefetches
                await sem.acquire()
        except RangeGone:
            pass
        self._log.info("uffd_aio.replay_finished", prefetches=self._c.prefetches,
                       pages=self._c.prefetched_pages, skipped=plan.skipped)

    def _orphan(self, page: int, n: int, fut: asyncio.Future[_Fetched], _task: object) -> None:
        """A prefetch task ended without settling its future (cancelled before it ran):
        release its pages, and let faults waiting on it fetch for themselves."""
        if not fut.done():
            self._release(page, n, fut)
            fut.set_exception(PagerClosed("prefetch cancelled"))
            fut.exception()

    async def _yield_to_faults(self, fut: asyncio.Future[_Fetched]) -> None:
        """Real faults first: wait (at most replay_max_wait) until no fault fetch is in
        flight.  Checked again after every wake-up: the caller's fetch follows at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._replay_max_wait
        # a fault that starts waiting for this very prefetch (_wanted) ends the yielding
        # at once: no priority inversion
        while self._fault_fetches and fut not in self._wanted:
            left = deadline - loop.time()
            if left <= 0:
                return
            changed = self._changed
            self._yielding += 1
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await changed.wait()
            finally:
                self._yielding -= 1

    def _notify(self) -> None:
        if self._yielding:  # nobody to wake otherwise: no Event churn on the fault path
            self._changed.set()
            self._changed = asyncio.Event()

    async def _prefetch(self, page: int, n: int, fut: asyncio.Future[_Fetched]) -> None:
        ps = self.page_size
        try:
            try:
                await self._yield_to_faults(fut)
                data = await self.backend.fetch(self.store_offset + page * ps, n * ps)
                if data is not None and len(data) != n * ps:
                    raise BackendError(f"{self.backend.name} returned {len(data)} bytes for "
                                       f"{n * ps}")
                await self._copy_direct(page, n, data)
            except BaseException as exc:
                self._release(page, n, fut)
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else
                                      PagerClosed("prefetch cancelled"))
                    fut.exception()
                if isinstance(exc, Exception) and not isinstance(exc, RangeGone):
                    self._c.fetch_errors += 1
                    self._log.warning("uffd_aio.prefetch_failed", page=page, pages=n,
                                      error=f"{type(exc).__name__}: {exc}")
                    return
                raise
            self._release(page, n, fut)
            fut.set_result((page, data))
        except RangeGone:
            return

    async def _copy_direct(self, page: int, n: int, data: Buffer | None) -> None:
        """UFFDIO_COPY without a fault (prefetch); retried while the mm is changing."""
        ps = self.page_size
        buf = data if data is not None else self._zero_buffer(n * ps)
        src, keep = ll.buffer_address(buf)
        dst = self.region.address + page * ps

        async def attempt() -> bool:
            if self._closed or self.region.closed:
                return False
            self.uffd().copy(dst, src, n * ps, wp=self._wp)
            return True

        try:
            done = await attempt()
        except MmChanging:
            done = await retry_while_mm_changing(attempt, op="UFFDIO_COPY", address=dst,
                                                 length=n * ps)
        del keep
        if not done:
            return
        self._c.prefetches += 1
        self._c.prefetched_pages += n
        self._mark_present(page, n)
        if self.dirty is not None:
            self.dirty.resident(page, n, None)


def attach(
    region: Region,
    backend: PageStore,
    *,
    store_offset: int | None = None,
    readahead: ReadaheadPolicy | int | str | None = None,
    dirty: DirtyPolicy | Callable[[], DirtyPolicy] | None = None,
    recorder: FaultRecorder | str | os.PathLike[str] | None = None,
    replay: Sequence[int] | str | os.PathLike[str] | None = None,
    replay_concurrency: int = 2,
    replay_batch: int = 16,
    replay_max_wait: float = 0.005,
    eager: bool | None = None,
    zero_removed: Container[int] | None = None,
    observe: Callable[[int, bool], object] | None = None,
) -> Attachment:
    """Serve ``region``'s faults from ``backend``; returns the :class:`Attachment`.

    * ``store_offset``: store offset of the region's first byte (default
      ``region.store_offset``, the handoff mapping's ``offset``).
    * ``readahead``: a :class:`~uffd_aio.serving.readahead.ReadaheadPolicy`, an
      int window in pages (0/1 = off), or ``"adaptive"`` / ``"adaptive:MAX"`` /
      ``"fixed:N"`` / ``"off"``.
    * ``dirty``: a :class:`~uffd_aio.serving.dirty.DirtyTracker` (needs a
      WP-registered region): pages go in write-protected, writes mark them
      dirty, and a ``max_resident`` budget evicts with write-back.  A tracker
      serves one region: to share options between several ``attach`` calls
      pass a factory, e.g. ``functools.partial(DirtyTracker, max_resident=N)``.
    * ``recorder``: a :class:`FaultRecorder` or a path: the order of first
      faults, saved on ``aclose()``.
    * ``replay``: a trace path or a sequence of store page indexes to prefetch
      in the background (``replay_concurrency`` fetches at a time, runs of
      at most ``replay_batch`` pages); real faults go first: a prefetch starts
      only when no fault fetch is in flight, or after ``replay_max_wait`` seconds.
    * ``eager``: run the handler inline until it first suspends (default: the
      backend's ``eager`` attribute, else the pager's setting).  Backends whose
      client needs a running Task (``asyncio.timeout`` inside) say ``eager = False``.
    * ``zero_removed``: page addresses the client discarded (REMOVE events, kept by the
      caller, e.g. ``uffd-aio serve --remove zero``): a fault there resolves as a zero
      page (the kind's default resolution) without a fetch, before anything else.
    * ``observe``: called as ``observe(store_page, is_write)`` for every MISSING fault
      (not removed) before it is served, read-ahead hits included (working-set recording).
    """
    tracker: DirtyPolicy | None
    if dirty is None or hasattr(dirty, "bind"):
        tracker = cast("DirtyPolicy | None", dirty)
    else:
        tracker = dirty()  # a factory: one tracker per region
    if isinstance(recorder, (str, os.PathLike)):
        recorder = FaultRecorder(recorder, page_size=region.page_size)
    if isinstance(replay, (str, os.PathLike)):
        ps, order = read_trace(replay)
        if ps != region.page_size:
            raise ValueError(f"trace {os.fspath(replay)!r} has page size {ps}, the region "
                             f"{region.page_size}")
        replay = order
    att = Attachment(
        region, backend,
        store_offset=region.store_offset if store_offset is None else store_offset,
        readahead=policy_from(readahead),
        dirty=tracker,
        recorder=recorder,
        replay=replay,
        replay_concurrency=replay_concurrency,
        replay_batch=replay_batch,
        replay_max_wait=replay_max_wait,
        zero_removed=zero_removed,
        observe=observe,
    )
    if tracker is not None:
        tracker.bind(att)
    if eager is None:
        eager = getattr(backend, "eager", None)
    region.on_fault(eager=eager)(att.handler)
    region.on_event(att.on_event)
    att._start_replay()
    return att
