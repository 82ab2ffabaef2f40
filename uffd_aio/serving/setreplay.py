"""Install a working set (and, optionally, the rest of the memory) without faults.

:class:`SetInstaller` walks an :class:`~uffd_aio.workingset.InstallPlan` for the regions
of one uffd (a handed-over client's mappings) and places each batch with ``UFFDIO_COPY``
(``UFFDIO_ZEROPAGE`` for zeros): the set in first-touch order, a chunk at a time, each
chunk sorted into runs of consecutive pages (one ioctl per run); then, with ``fill``,
every page still missing, ascending.

Sources: a read-only mapping of the snapshot file (``src_base``: the copy reads the page
cache directly, no buffer, no await), or any backend (``backend.fetch`` per run).

**Real faults first.**  The installer runs on the pager's loop, between batches it
yields to the loop (``asyncio.sleep(0)``), so a fault that arrived meanwhile (the native
engine's or Python's) is served before the next batch: a fault waits at most one batch
(``chunk`` pages, a fraction of a millisecond from the page cache).  During the fill
(low priority) a batch that saw new faults is followed by a pause of ``fill_backoff``.
Pages already present (a fault, or the engine's read-ahead, got there first: the installer
does not track them) are skipped by the kernel (``EEXIST``); a copy never overwrites a
page, so a racing fault or write is never lost.  A run the kernel refuses with
``EAGAIN`` (the address space is changing) is left to the fault path.
"""

from __future__ import annotations

import asyncio
import errno as E
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from uffd_aio.binding import lowlevel as ll
from uffd_aio.log import get_logger
from uffd_aio.stores.base import PageStore
from uffd_aio.workingset import InstallPlan

__all__ = ["InstallMetrics", "SetInstaller", "Target"]


@attrs.define(eq=False)
class Target:
    """One region: store pages ``[lo, hi)`` at ``address`` on the uffd ``fd``."""

    lo: int
    hi: int
    address: int
    fd: int
    #: page -> True when the client discarded it (``remove="zero"``): not installed
    removed: Callable[[int], bool] | None = None
    installed: bytearray = attrs.field(init=False)
    gone: bool = False

    def __attrs_post_init__(self) -> None:
        self.installed = bytearray(self.hi - self.lo)


@attrs.define(eq=False)
class InstallMetrics:
    """What a replay did (``uffd_aio.workingset_installed``)."""

    set_pages: int = 0          # pages of the set in the served mappings
    pages_by_replay: int = 0    # set pages this installer placed
    pages_by_fill: int = 0      # other pages the fill placed
    already_present: int = 0    # pages the kernel already had (EEXIST): faults got there
    deferred: int = 0           # pages left to faults (EAGAIN: address space changing)
    copies: int = 0             # ioctls
    gone: int = 0               # mappings that went away (unmapped, client exited)
    set_installed_s: float | None = None
    #: None unless the fill reached the end of every mapping
    fully_resident_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


class SetInstaller:
    """Install ``plan`` into ``targets`` from ``src_base`` (address of store page 0 in a
    read-only mapping) or ``backend``; ``faults()`` counts the demand faults so far."""

    def __init__(self, plan: InstallPlan, targets: Sequence[Target], *, page_size: int,
                 src_base: int | None = None, backend: PageStore | None = None,
                 faults: Callable[[], int] = lambda: 0,
                 fill_backoff: float = 0.001, log: Any = None,
                 set_phase: Callable[[bool], None] | None = None) -> None:
        if (src_base is None) == (backend is None):
            raise ValueError("give exactly one of src_base and backend")
        self.plan = plan
        self.targets = sorted(targets, key=lambda t: t.lo)
        self.page_size = page_size
        self.src_base = src_base
        self.backend = backend
        self.faults = faults
        self.fill_backoff = fill_backoff
        #: called with True when the set phase starts and False when it ends (the server
        #: stops the engine's extra reads meanwhile: see docs/backends.md)
        self.set_phase = set_phase
        self.metrics = InstallMetrics(set_pages=plan.set_pages)
        self.t0 = time.monotonic()
        self._log = log if log is not None else get_logger(component="setreplay")
        self._closed = False

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def _target(self, page: int) -> Target | None:
        for t in self.targets:
            if t.lo <= page < t.hi:
                return t
        return None

    def _skip(self, page: int) -> bool:
        t = self._target(page)
        if t is None or t.gone:
            return True
        if t.installed[page - t.lo]:
            return True
        return t.removed is not None and t.removed(page)

    async def run(self) -> InstallMetrics:
        if self.set_phase is not None:
            self.set_phase(True)
        try:
            return await self._run()
        finally:
            if self.set_phase is not None:
                self.set_phase(False)

    async def _run(self) -> InstallMetrics:
        m = self.metrics
        check = any(t.removed is not None for t in self.targets)
        skip = self._skip
        if self.src_base is not None:
            # the fast path: a chunk of sorted pages per target, one native call each
            for pages in self.plan.set_chunks(skip if check else None):
                if self._closed:
                    return m
                m.pages_by_replay += self._install_pages(pages)
                await asyncio.sleep(0)  # real faults first: the loop serves what arrived
        else:
            for pages in self.plan.set_chunks(skip if check else None):
                if self._closed:
                    return m
                for first, n in self.plan.runs(pages):
                    t = self._target(first)
                    if t is not None and not t.gone:
                        m.pages_by_replay += await self._install(t, first, n)
                await asyncio.sleep(0)
        if self._closed:
            return m
        self._set_done()
        if not self.plan.fill:
            return m
        last_faults = self.faults()
        for runs in self.plan.fill_batches(skip):
            if self._closed:
                return m
            if self.src_base is not None:
                m.pages_by_fill += self._install_mapped(runs)
            else:
                for first, n in runs:
                    t = self._target(first)
                    if t is not None and not t.gone:
                        m.pages_by_fill += await self._install(t, first, n)
            await asyncio.sleep(0)
            now = self.faults()  # low priority: pause while the client is faulting
            if now != last_faults and self.fill_backoff > 0:
                await asyncio.sleep(self.fill_backoff)
            last_faults = now
        if not self._closed and not any(t.gone for t in self.targets):
            m.fully_resident_s = round(time.monotonic() - self.t0, 6)
        m.gone = sum(t.gone for t in self.targets)
        return m

    def _install_pages(self, pages: list[int]) -> int:
        """Copy sorted store pages from the snapshot mapping, one native call per target
        (consecutive pages as one ioctl); returns the pages placed."""
        assert self.src_base is not None
        ps = self.page_size
        m = self.metrics
        placed = 0
        for t in self.targets:
            if t.gone:
                continue
            lo, hi = t.lo, t.hi
            if lo <= pages[0] and pages[-1] < hi:
                sel = pages
            else:
                sel = [p for p in pages if lo <= p < hi]
                if not sel:
                    continue
            rel = array("I", [p - lo for p in sel]) if lo else array("I", sel)
            rc, (got, there, left, ioctls, stop) = ll.uffd_copy_pages(
                t.fd, t.address, self.src_base + lo * ps, ps, rel)
            m.copies += ioctls
            m.already_present += there
            m.deferred += left
            placed += got
            inst = t.installed
            for r in rel[:stop]:
                inst[r] = 1
            if rc < 0:
                t.gone = True
                if rc not in (-E.ENOENT, -E.ESRCH, -E.EBADF):
                    self._log.warning("uffd_aio.workingset_copy_failed",
                                      error=E.errorcode.get(-rc, str(rc)))
        return placed

    def _set_done(self) -> None:
        self.metrics.set_installed_s = round(time.monotonic() - self.t0, 6)
        if self.set_phase is not None:
            self.set_phase(False)
            self.set_phase = None

    def _install_mapped(self, runs: list[tuple[int, int]]) -> int:
        """Copy a batch of runs from the snapshot mapping, in one native call per uffd;
        returns the pages placed."""
        assert self.src_base is not None
        ps = self.page_size
        base = self.src_base
        placed = 0
        todo: list[tuple[Target, int, int]] = []
        for first, n in runs:
            t = self._target(first)
            if t is not None and not t.gone:
                todo.append((t, first, n))
        while todo:
            fd = todo[0][0].fd
            batch = [x for x in todo if x[0].fd == fd]
            todo = [x for x in todo if x[0].fd != fd]
            triples = array("Q")
            for t, first, n in batch:
                triples.extend((t.address + (first - t.lo) * ps, base + first * ps, n * ps))
            rc, (got, there, left, ioctls, stop) = ll.uffd_copy_runs(fd, triples, ps)
            m = self.metrics
            m.copies += ioctls
            m.already_present += there
            m.deferred += left
            placed += got
            for t, first, n in batch[:stop]:
                t.installed[first - t.lo:first - t.lo + n] = b"\x01" * n
            if rc < 0:
                t = batch[stop][0]
                if rc in (-E.ENOENT, -E.ESRCH, -E.EBADF):
                    t.gone = True
                else:
                    self._log.warning("uffd_aio.workingset_copy_failed",
                                      error=E.errorcode.get(-rc, str(rc)))
                    t.gone = True
                # the runs after the failed one come back in a later batch (or to faults)
        return placed

    async def _install(self, t: Target, first: int, n: int) -> int:
        """Place store pages [first, first+n) of target ``t``; returns pages placed."""
        ps = self.page_size
        rel = first - t.lo
        dst = t.address + rel * ps
        src = 0
        keep: Any = None
        zero = False
        if self.src_base is not None:
            src = self.src_base + first * ps
        else:
            assert self.backend is not None
            data = await self.backend.fetch(first * ps, n * ps)
            if self._closed or t.gone:
                return 0
            if data is None:
                zero = True
            else:
                src, keep = ll.buffer_address(data)
        placed = self._copy(t, dst, src, n * ps, zero)
        del keep
        t.installed[rel:rel + n] = b"\x01" * n
        return placed

    def _copy(self, t: Target, dst: int, src: int, length: int, zero: bool) -> int:
        ps = self.page_size
        m = self.metrics
        done = placed = 0
        while done < length:
            m.copies += 1
            if zero:
                rc, k = ll.uffd_zeropage(t.fd, dst + done, length - done, 0)
            else:
                rc, k = ll.uffd_copy(t.fd, dst + done, src + done, length - done, 0)
            if rc == 0:
                placed += (length - done) // ps
                break
            if k > 0:  # partial progress: continue after it
                placed += k // ps
                done += k
                continue
            if rc == -E.EEXIST:  # a fault (or the engine's read-ahead) got there first
                m.already_present += 1
                done += ps
                continue
            if rc == -E.EAGAIN:  # the address space is changing: leave it to faults
                m.deferred += (length - done) // ps
                break
            if rc in (-E.ENOENT, -E.ESRCH, -E.EBADF):  # unmapped, exited, closed
                t.gone = True
                break
            self._log.warning("uffd_aio.workingset_copy_failed", address=hex(dst + done),
                              bytes=length - done, error=E.errorcode.get(-rc, str(rc)))
            m.deferred += (length - done) // ps
            break
        return placed
