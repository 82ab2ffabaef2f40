"""Dirty-page tracking and eviction under a resident-memory budget.

Use with :func:`uffd_aio.serving.attach` on a region registered
``Mode.MISSING | Mode.WP``::

    tracker = DirtyTracker(max_resident=64 << 20)
    att = attach(region, backend, dirty=tracker)

**Tracking.**  Pages are mapped write-protected (``UFFDIO_COPY`` with
``MODE_WP``; zero pages too, as a copy of zeros, because a zeropage mapping
would take writes silently).  The first write to a page raises a WP fault:
the page is marked dirty and unprotected, so later writes run at full
speed.  A write fault on a missing page maps that page writable and dirty
at once (one fault, not two).

**Eviction.**  With ``max_resident`` (bytes), when the pages this region has
mapped exceed the budget, a background task evicts the coldest ones down to
``max_resident - headroom``.  "Coldest" is approximate LRU by fault order:
pages enter the list when they are mapped and move to its hot end when they
take a (WP) fault; reads of resident pages are invisible to a pager, so a
page that is read constantly but never re-faults still ages out (it then
faults back in: correct, just slower).  Each batch:

1. marks its pages *evicting* -- faults on them wait for the batch;
2. write-protects them (UFFDIO_WRITEPROTECT): from here on a write blocks in
   a WP fault instead of changing the page under us;
3. reads the dirty ones (in a worker thread) and writes them back with
   ``backend.store()`` -- *before* anything is dropped;
4. drops the pages: ``MADV_DONTNEED`` (private anonymous memory) or
   ``MADV_REMOVE`` (memfd/shmem regions), in a worker thread, because with
   ``EVENT_REMOVE`` the kernel holds madvise() until the pager has read the
   REMOVE event, which the loop thread must be free to do;
5. clears the *evicting* mark: a reader that faulted meanwhile now fetches
   the written-back content; a blocked writer is woken, faults the page back
   in as a write fault and dirties it again.

The evictor never takes a page that a WP fault is unprotecting (*busy*) or
that has any fault in flight, and a WP fault never unprotects a page that is
being evicted or was evicted since (it waits, then only wakes the writer):
an unprotect between steps 2 and 4 would let a write land after the
write-back read the page, and be dropped with it (docs/backends.md, "Dirty
tracking": the protocol).

If a write-back fails, the dirty pages it could not store stay resident,
dirty and write-protected (a later write just faults once more) and move to
the hot end, so clean pages are evicted first; a round that can evict
nothing backs off (1 s), and admission stops waiting for it meanwhile.

The budget is soft: fetches in flight can exceed it by their windows.  When
resident pages exceed ``max_resident * hard_limit_factor``, new faults wait
(bounded, ``admission_wait`` seconds) for eviction to catch up.

**Handed-off regions** (memory of another process, ``region.remote``):
eviction needs ``MADV_DONTNEED`` *in the memory's process*, and
``process_madvise(2)`` only accepts MADV_COLD/PAGEOUT/WILLNEED/COLLAPSE, so a
pager cannot drop a client's pages from outside.  Eviction is therefore
disabled there (logged once as ``uffd_aio.eviction_unsupported``); dirty
tracking still works.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from uffd_aio.binding import lowlevel as ll
from uffd_aio.log import get_logger
from uffd_aio.uffd import RangeGone

if TYPE_CHECKING:
    from uffd_aio.region import PageFault
    from uffd_aio.serving.attach import Attachment

__all__ = ["DirtyTracker"]


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted pages -> [(first, count)] of consecutive runs."""
    out: list[tuple[int, int]] = []
    for p in sorted(pages):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


_BASE_PAGE = os.sysconf("SC_PAGE_SIZE")


def _present(pagemap: int, address: int, npages: int, page_size: int) -> list[bool]:
    """Whether each page is mapped, from /proc/self/pagemap (bit 63): reading it never
    faults, where touching a page that is not there would wait for its (uffd) fault."""
    step = page_size // _BASE_PAGE
    data = os.pread(pagemap, npages * step * 8, (address // _BASE_PAGE) * 8)
    return [bool(int.from_bytes(data[i * step * 8:i * step * 8 + 8], "little") >> 63)
            for i in range(npages)]


class DirtyTracker:
    """Tracks written pages of one attached region and evicts under ``max_resident``.

    * ``max_resident``: bytes of this region that may be mapped (None: no eviction).
    * ``batch_pages``: pages evicted per batch (and per write-back round).
    * ``headroom``: bytes below the budget that one eviction round frees down
      to (default: one batch, at most an eighth of the budget).
    * ``hard_limit_factor`` / ``admission_wait``: backpressure (see module doc).
    """

    def __init__(self, *, max_resident: int | None = None, batch_pages: int = 256,
                 headroom: int | None = None, hard_limit_factor: float = 1.1,
                 admission_wait: float = 1.0) -> None:
        if max_resident is not None and max_resident <= 0:
            raise ValueError("max_resident must be > 0 bytes")
        if batch_pages < 1:
            raise ValueError("batch_pages must be >= 1")
        self.max_resident = max_resident
        self.batch_pages = batch_pages
        self._headroom = headroom
        self.hard_limit_factor = hard_limit_factor
        self.admission_wait = admission_wait
        self._att: Attachment | None = None
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._dirty: set[int] = set()
        self._evicting: dict[int, asyncio.Future[None]] = {}
        #: evicting pages that a Remove/Unmap dropped meanwhile (see forget())
        self._dropped: set[int] = set()
        #: pages with a WP fault being handled that may unprotect them (on_wp_fault):
        #: the evictor and flush() leave them alone, and a page mapped meanwhile is dirty
        self._wp_busy: set[int] = set()
        #: pages this tracker knows are not mapped (evicted, or dropped by Remove/Unmap)
        #: since it last saw them mapped: a WP fault on one is stale (see on_wp_fault)
        self._gone: set[int] = set()
        self._wakeup: asyncio.Event | None = None
        self._progress: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._can_evict = False
        self._advice = ll.MADV_DONTNEED
        self._log = get_logger(component="dirty")
        #: counters
        self.evicted_pages = 0
        self.eviction_batches = 0
        self.written_back_pages = 0
        self.writeback_failures = 0
        self.wp_faults = 0
        #: WP faults on pages evicted since they were raised (the writer was just woken)
        self.stale_wp_faults = 0
        #: eviction candidates passed over because a fault on them was in flight
        self.busy_skips = 0
        self.admission_waits = 0
        self.evict_seconds = 0.0
        self.peak_resident_pages = 0
        self._last_failure_log = -1e9
        #: the last eviction round could evict nothing (write-back failing)
        self._stalled = False

    # ---- DirtyPolicy -----------------------------------------------------------

    def bind(self, att: Attachment) -> None:
        if self._att is not None:
            raise RuntimeError("a DirtyTracker serves one attachment")
        self._att = att
        region = att.region
        self._log = self._log.bind(region=region.name)
        ps = att.page_size
        if self._headroom is None and self.max_resident is not None:
            self._headroom = min(self.batch_pages * ps, self.max_resident // 8)
        if region.memfd is not None:
            self._advice = ll.MADV_REMOVE
        if self.max_resident is None:
            return
        if region.remote:
            self._log.warning(
                "uffd_aio.eviction_unsupported", region=region.name,
                reason="the region lives in another process: MADV_DONTNEED cannot be applied "
                "from outside (process_madvise allows only COLD/PAGEOUT/WILLNEED/COLLAPSE); "
                "max_resident is ignored, dirty pages are still tracked")
            return
        if self.max_resident < ps:
            raise ValueError(f"max_resident {self.max_resident} is smaller than a page")
        self._can_evict = True
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._evictor())

    def evicting(self, page: int) -> Awaitable[None] | None:
        fut = self._evicting.get(page)
        if fut is not None and page not in self._dropped:
            return asyncio.shield(fut)
        if self._can_evict and self._over_hard_limit():
            return self._admit()
        return None

    def is_evicting(self, page: int) -> bool:
        return page in self._evicting

    async def on_wp_fault(self, ev: PageFault, page: int) -> None:
        """Mark the page dirty and unprotect it, unless it is (being) evicted.

        The write-fault half of the protocol with the evictor (docs/backends.md,
        "Dirty tracking"): an unprotect is only issued for a page that is mapped and
        not being evicted, and from then until the unprotect is done the page is
        *busy*: the evictor and flush() skip it, so no write-back can read it before
        the writer's write is in and then drop it.  A page that was evicted is never
        unprotected (a late unprotect could make a page mapped again meanwhile
        writable without being dirty): the writer is only woken, and faults it back
        in as a MISSING write fault, served from the written-back store.
        """
        self.wp_faults += 1
        att = self._att
        assert att is not None
        fut = self._evicting.get(page)
        while fut is not None:
            await asyncio.shield(fut)
            fut = self._evicting.get(page)  # a new batch may have taken it meanwhile
        if page in self._gone:
            await self._wake(ev)
            return
        # a WP fault means the page is mapped, whoever mapped it
        att.mark_present(page, 1)
        self._dirty.add(page)
        lru = self._lru
        lru[page] = None
        lru.move_to_end(page)
        self._wp_busy.add(page)
        try:
            await ev.unprotect()
        finally:
            self._wp_busy.discard(page)

    async def _wake(self, ev: PageFault) -> None:
        """Resolve a stale WP fault by waking the writer, changing no protection: the
        page is not mapped any more (evicted since the fault), so the writer's retry
        is a MISSING write fault, which maps the page writable and dirty."""
        self.stale_wp_faults += 1
        await ev.wake()

    def resident(self, first: int, count: int, written: int | None) -> None:
        lru = self._lru
        gone, busy = self._gone, self._wp_busy
        for p in range(first, first + count):
            lru[p] = None
            lru.move_to_end(p)
            gone.discard(p)
            if p in busy:  # an unprotect for a writer is on its way: count it written
                self._dirty.add(p)
        if written is not None:
            self._dirty.add(written)
        if len(lru) > self.peak_resident_pages:
            self.peak_resident_pages = len(lru)
        if self._can_evict and self._over_budget():
            assert self._wakeup is not None
            self._wakeup.set()

    def forget(self, first: int, end: int) -> None:
        """Pages [first, end) were dropped (Remove/Unmap).

        Pages being evicted keep their state for the evictor, but are marked
        *dropped*: a fault on them no longer waits for the eviction (the
        evictor may be reading exactly that page, which would then wait for
        the fault: a deadlock), it fetches the page again at once.
        """
        lru, dirty, evicting = self._lru, self._dirty, self._evicting
        if evicting:
            self._dropped.update(p for p in range(first, end) if p in evicting)
        if end - first > len(lru):
            for p in [p for p in lru if first <= p < end and p not in evicting]:
                del lru[p]
                dirty.discard(p)
                self._gone.add(p)
        else:
            for p in range(first, end):
                if p not in evicting:
                    if p in lru:
                        del lru[p]
                        self._gone.add(p)
                    dirty.discard(p)

    async def aclose(self) -> None:
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            # the evictor finishes its current batch (never leave pages half-evicted)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ---- state ---------------------------------------------------------------

    @property
    def dirty_pages(self) -> int:
        return len(self._dirty)

    @property
    def resident_pages(self) -> int:
        return len(self._lru)

    @property
    def resident_bytes(self) -> int:
        return len(self._lru) * (self._att.page_size if self._att else 0)

    def is_dirty(self, page: int) -> bool:
        return page in self._dirty

    def _over_budget(self) -> bool:
        assert self.max_resident is not None
        return self.resident_bytes > self.max_resident

    def _over_hard_limit(self) -> bool:
        assert self.max_resident is not None
        return self.resident_bytes > self.max_resident * self.hard_limit_factor

    async def _admit(self) -> None:
        """Backpressure: wait (bounded) until eviction brings residency under the hard limit."""
        assert self._progress is not None and self._wakeup is not None
        self.admission_waits += 1
        self._wakeup.set()
        deadline = time.monotonic() + self.admission_wait
        while self._over_hard_limit() and not self._closing and not self._stalled:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._progress.clear()
            # wait_for, not asyncio.timeout: eager handlers may run without a Task
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), left)

    # ---- write-back ------------------------------------------------------------

    async def flush(self) -> int:
        """Write back every dirty page (they stay resident, write-protected again); pages written.

        In-process regions only (the memory must be readable here).
        """
        att = self._att
        assert att is not None
        if att.region.remote:
            raise RuntimeError(f"{att.region!r} lives in another process: its dirty pages "
                               "cannot be read from here")
        total = 0
        while True:
            busy = self._wp_busy
            pages = [p for p in self._dirty if p not in self._evicting and p not in busy
                     ][:self.batch_pages * 16]
            if not pages:
                if not any(p in self._dirty for p in busy):
                    return total
                # a writer is being unprotected: its write is not in yet (see on_wp_fault)
                await asyncio.sleep(0.001)
                continue
            fut = asyncio.get_running_loop().create_future()
            for p in pages:
                self._evicting[p] = fut  # faults on them wait while we read them
            try:
                runs = _runs(pages)
                self._protect(runs)
                await self._write_back(runs)
                total += len(pages)
            finally:
                for p in pages:
                    if self._evicting.get(p) is fut:
                        del self._evicting[p]
                fut.set_result(None)

    def _protect(self, runs: list[tuple[int, int]]) -> None:
        att = self._att
        assert att is not None
        uffd = att.uffd()
        ps = att.page_size
        base = att.region.address
        for first, n in runs:
            uffd.writeprotect(base + first * ps, n * ps, protect=True)

    async def _write_back(self, runs: list[tuple[int, int]]) -> None:
        """Read the (protected) pages and store them; clears their dirty marks on success."""
        att = self._att
        assert att is not None
        ps = att.page_size
        base = att.region.address

        def read_all() -> tuple[list[tuple[int, int]], list[bytes], list[int]]:
            # Only pages that are mapped: a dirty mark can outlive its page (a write fault
            # on a page evicted meanwhile only wakes the writer, whose write then lands
            # through a MISSING fault). Reading such a page would wait for that fault,
            # whose handler waits for this eviction: a deadlock. The pages are
            # write-protected and faults on them wait for the eviction, so what is
            # mapped now stays mapped until the read is done.
            present: list[int] = []
            absent: list[int] = []
            pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            try:
                for first, n in runs:
                    for i, here in enumerate(_present(pagemap, base + first * ps, n, ps)):
                        (present if here else absent).append(first + i)
            finally:
                os.close(pagemap)
            pruns = _runs(present)
            return pruns, [ll.read_memory(base + f * ps, n * ps) for f, n in pruns], absent

        pruns, datas, absent = await asyncio.to_thread(read_all)
        for p in absent:  # nothing of it in memory: the store has its latest content
            self._dirty.discard(p)
        if absent:
            self._log.debug("uffd_aio.writeback_absent", pages=len(absent))
        # a write fault that came in while we read was blocked: the data is current
        for (first, n), data in zip(pruns, datas, strict=True):
            await att.backend.store(att.store_offset + first * ps, data)
            for p in range(first, first + n):
                self._dirty.discard(p)
            self.written_back_pages += n

    # ---- eviction ---------------------------------------------------------------

    async def _evictor(self) -> None:
        assert self._wakeup is not None and self._progress is not None
        max_resident = self.max_resident
        assert max_resident is not None
        while not self._closing:
            await self._wakeup.wait()
            self._wakeup.clear()
            target = max_resident - (self._headroom or 0)
            while not self._closing and self.resident_bytes > target:
                victims = self._pick()
                if not victims:
                    break
                try:
                    ok = await self._evict(victims)
                except Exception as exc:  # the region went away under us (pager closed)
                    att = self._att
                    gone = att is not None and (att.region.closed or att.region.pager.closing)
                    if not gone:
                        self._log.error("uffd_aio.eviction_failed", exc_info=exc)
                    self._can_evict = False
                    return
                self._stalled = not ok
                self._progress.set()
                if not ok:  # write-back failing: back off (aclose() cuts it short)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), 1.0)
                    break

    def _pick(self) -> list[int]:
        att = self._att
        assert att is not None
        out: list[int] = []
        skipped: list[int] = []
        lru = self._lru
        busy = self._wp_busy
        base, ps = att.region.address, att.page_size
        in_flight = att.region.pager.fault_in_flight
        while lru and len(out) < self.batch_pages:
            p, _ = lru.popitem(last=False)
            # being re-fetched, being unprotected for a writer, or any fault on it in
            # flight (say a read-ahead hit about to map it): keep it, try later.  A
            # fault that comes in after this waits for the eviction (evicting()).
            if att.is_pending(p) or p in busy or in_flight(base + p * ps):
                skipped.append(p)
                self.busy_skips += 1
                continue
            out.append(p)
        for p in reversed(skipped):
            lru[p] = None
            lru.move_to_end(p, last=False)
        return out

    async def _evict(self, pages: list[int]) -> bool:
        """Evict ``pages``; False when nothing could be evicted (the caller backs off)."""
        att = self._att
        assert att is not None
        t0 = time.perf_counter()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for p in pages:
            self._evicting[p] = fut
        ps = att.page_size
        base = att.region.address
        lru = self._lru
        ok = False
        try:
            try:
                self._protect(_runs(pages))
            except RangeGone:
                return True  # the region went away: nothing to evict
            except Exception as exc:
                self._log.error("uffd_aio.eviction_failed", pages=len(pages),
                                error=f"{type(exc).__name__}: {exc}")
                for p in pages:  # back to the cold end, still resident
                    lru[p] = None
                    lru.move_to_end(p, last=False)
                return False
            keep: set[int] = set()
            dirty_pages = [p for p in pages if p in self._dirty]
            if dirty_pages:
                try:
                    await self._write_back(_runs(dirty_pages))
                except RangeGone:
                    return True
                except Exception as exc:
                    # the runs stored before the failure are clean now; the others stay
                    # resident, dirty and write-protected, at the hot end so that the
                    # clean pages go first next time
                    keep = {p for p in dirty_pages if p in self._dirty}
                    self.writeback_failures += 1
                    now = time.monotonic()
                    if now - self._last_failure_log > 10:
                        self._last_failure_log = now
                        self._log.error("uffd_aio.writeback_failed", pages=len(keep),
                                        error=f"{type(exc).__name__}: {exc}",
                                        hint="dirty pages stay resident; clean ones are "
                                        "still evicted")
                    for p in keep:
                        lru[p] = None
            victims = [p for p in pages if p not in keep]
            if not victims:
                return False
            runs = _runs(victims)
            advice = self._advice

            def drop() -> None:
                for first, n in runs:
                    ll.madvise(base + first * ps, n * ps, advice)

            await asyncio.to_thread(drop)
            dropped = self._dropped
            for p in victims:
                if p in dropped:  # forgotten meanwhile: maybe re-fetched already
                    continue
                att.mark_absent(p, p + 1)
                self._dirty.discard(p)
                self._gone.add(p)
            self.evicted_pages += len(victims)
            self.eviction_batches += 1
            ok = True
            return True
        finally:
            for p in pages:
                if self._evicting.get(p) is fut:
                    del self._evicting[p]
                self._dropped.discard(p)
            fut.set_result(None)
            self.evict_seconds += time.perf_counter() - t0
            if not ok:
                self._log.debug("uffd_aio.eviction_aborted", pages=len(pages))
