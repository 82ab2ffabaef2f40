"""Install a working set (and, optionally, the rest of the memory) without faults.

:class:`SetInstaller` walks an :class:`~uffd_aio.workingset.InstallPlan` for the regions
of one uffd (a handed-over client's mappings) and places each batch with ``UFFDIO_COPY``
(``UFFDIO_ZEROPAGE`` for zeros): the set in first-touch order, a chunk at a time, each
chunk sorted into runs of consecutive pages (one ioctl per run); then, with ``fill``,
every page still missing, ascending.

Sources: a read-only mapping of the snapshot file (``src_base``), or any backend
(``backend.fetch`` per run).

**The snapshot mapping never blocks the loop on the disk** (given ``ring`` and ``src_fd``,
as the server does).  A ``UFFDIO_COPY`` from a mapped page that is not in the page cache
faults the source mapping and reads the disk inside the ioctl, on the loop thread: a cold
restore (the common case) would stall real faults behind a whole batch of disk reads.  So,
as the native engine does for demand faults, each batch is first checked with ``mincore``
(no blocking, no fault): resident runs are copied from the mapping as before (one native
call, no buffer, no await), and the runs that are not are read with io_uring READs on the
loop's one ring (the server's) into a page-aligned buffer, then copied from it on
completion (``pages_read``, ``reads``).  Runs close together share a READ (the pages
between land in the page cache, like the kernel's read-around of a mapping fault:
:func:`read_extents`).  Reading (rather than readahead, ``fadvise`` or an
io_uring ``FADVISE``, then copying from the mapping on a later pass) is the simplest
correct choice: the completion *is* the data, there is no second residency check, no pass
that finds the pages evicted again, and no polling.  Meanwhile the loop serves faults; when
the read completes, pages the client discarded since (``removed``) are left out and pages a
fault placed meanwhile come back ``EEXIST``.  A short read (the file was truncated) or a
failed one leaves its pages to the fault path, whose error policy applies.  Without
``ring`` the mapping is copied from unconditionally (a cold page then blocks the loop).
``mincore`` only sees the page cache of files one owns or may write (Linux 5.0+; others
read as resident, and are copied as without ``ring``).

**Real faults first.**  The installer runs on the pager's loop, between batches it
yields to the loop (``asyncio.sleep(0)``), so a fault that arrived meanwhile (the native
engine's or Python's) is served before the next batch: a fault waits at most one batch
(``chunk`` pages, a fraction of a millisecond from the page cache; a batch read from the
disk is awaited, not waited for).  During the fill
(low priority) a batch that saw new faults is followed by a pause of ``fill_backoff``.
Pages already present (a fault, or the engine's read-ahead, got there first: the installer
does not track them) are skipped by the kernel (``EEXIST``); a copy never overwrites a
page, so a racing fault or write is never lost.  A run the kernel refuses with
``EAGAIN`` (the address space is changing) is left to the fault path.
"""

from __future__ import annotations

import asyncio
import errno as E
import mmap
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from uffd_aio.binding import lowlevel as ll
from uffd_aio.log import get_logger
from uffd_aio.ring import Ring
from uffd_aio.stores.base import PageStore
from uffd_aio.workingset import InstallPlan

__all__ = ["InstallMetrics", "SetInstaller", "Target", "read_extents", "resident_pages",
           "split_runs"]

#: mincore byte -> 1 (bit 0: in the page cache) or 0
_BIT0 = bytes(i & 1 for i in range(256))


def resident_pages(vec: bytes, ratio: int = 1) -> bytes:
    """Per page (of ``ratio`` system pages each) 1 when every one of its system pages is in
    the page cache, else 0, from a ``mincore`` vector."""
    bits = vec.translate(_BIT0)
    if ratio == 1:
        return bits
    full = b"\x01" * ratio
    return bytes(bits[i:i + ratio] == full for i in range(0, len(bits), ratio))


def read_extents(runs: Sequence[tuple[int, int]], gap: int, max_pages: int
                 ) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Group sorted runs ``(first, n)`` into READs ``(first, n, runs)``: runs at most
    ``gap`` pages apart share one (the pages between are read too: into the page cache,
    as the kernel's read-around of a mapping fault would), at most ``max_pages`` long (a
    longer run is cut)."""
    out: list[tuple[int, int, list[tuple[int, int]]]] = []
    for first, n in runs:
        while n > 0:
            k = min(n, max_pages)
            if out:
                efirst, en, inner = out[-1]
                end = efirst + en
                if first - end <= gap and first + k - efirst <= max_pages:
                    inner.append((first, k))
                    out[-1] = (efirst, first + k - efirst, inner)
                    first, n = first + k, n - k
                    continue
            out.append((first, k, [(first, k)]))
            first, n = first + k, n - k
    return out


def split_runs(runs: Sequence[tuple[int, int]], lo: int, resident: bytes
               ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Cut runs of pages ``(first, n)`` into the resident and the missing pieces, from
    ``resident`` (one byte per page from page ``lo``, see :func:`resident_pages`); each
    piece keeps its order."""
    warm: list[tuple[int, int]] = []
    cold: list[tuple[int, int]] = []
    for first, n in runs:
        rel = first - lo
        start = 0
        state = resident[rel]
        for i in range(1, n + 1):
            cur = resident[rel + i] if i < n else 2
            if cur != state:
                (warm if state else cold).append((first + start, i - start))
                start, state = i, cur
    return warm, cold


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
    #: pages not in the page cache, read with io_uring READs (a cold snapshot), and those
    #: READs; the rest was copied from the snapshot mapping (or fetched from the backend)
    pages_read: int = 0
    reads: int = 0
    gone: int = 0               # mappings that went away (unmapped, client exited)
    set_installed_s: float | None = None
    #: None unless the fill reached the end of every mapping
    fully_resident_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


class SetInstaller:
    """Install ``plan`` into ``targets`` from ``src_base`` (address of store page 0 in a
    read-only mapping) or ``backend``; ``faults()`` counts the demand faults so far.

    With ``src_base``, ``ring`` (the loop's shared ring) and ``src_fd`` (the mapped file,
    store page 0 at offset 0) let pages missing from the page cache be read with io_uring
    instead of faulting the mapping on the loop thread."""

    def __init__(self, plan: InstallPlan, targets: Sequence[Target], *, page_size: int,
                 src_base: int | None = None, backend: PageStore | None = None,
                 ring: Ring | None = None, src_fd: int | None = None,
                 faults: Callable[[], int] = lambda: 0,
                 fill_backoff: float = 0.001, log: Any = None,
                 set_phase: Callable[[bool], None] | None = None) -> None:
        if (src_base is None) == (backend is None):
            raise ValueError("give exactly one of src_base and backend")
        if (ring is None) != (src_fd is None) or (ring is not None and src_base is None):
            raise ValueError("ring and src_fd go together, with src_base")
        self.plan = plan
        self.targets = sorted(targets, key=lambda t: t.lo)
        self.page_size = page_size
        self.src_base = src_base
        self.backend = backend
        self.ring = ring
        self.src_fd = src_fd
        self._ratio = max(1, page_size // ll.PAGE_SIZE)
        self._rbufs: list[mmap.mmap | None] = [None, None]  # the read buffers
        #: cold runs at most ``read_gap`` pages apart share a READ of at most ``read_max``
        #: pages; ``read_budget`` pages of READs a buffer, two buffers
        #: (the gap is the mapping fault's read-around: 128 KiB by default, up to the
        #: device's read_ahead_kb; fewer, larger READs were measured faster: see
        #: docs/backends.md)
        self.read_gap = 64
        self.read_max = 512
        self.read_budget = 2048
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
            self._rbufs = [None, None]  # the read buffers go (a READ in flight pins its own)
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
                m.pages_by_replay += await self._place_pages(pages)
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
                m.pages_by_fill += await self._place_runs(runs)
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

    def _resident(self, runs: Sequence[tuple[int, int]]) -> tuple[int, bytes] | None:
        """``(lo, bytes)``: one byte per store page from ``lo`` covering ``runs`` (sorted),
        1 when in the page cache; None when all are (or when mincore cannot tell)."""
        assert self.src_base is not None
        ps = self.page_size
        lo = runs[0][0]
        hi = runs[-1][0] + runs[-1][1]
        pages = sum(n for _, n in runs)
        try:
            if hi - lo <= 4 * pages + 1024:  # one call over the span
                res = resident_pages(ll.mincore(self.src_base + lo * ps, (hi - lo) * ps),
                                     self._ratio)
            else:  # sparse: one call per run
                buf = bytearray(hi - lo)
                for first, n in runs:
                    buf[first - lo:first - lo + n] = resident_pages(
                        ll.mincore(self.src_base + first * ps, n * ps), self._ratio)
                res = bytes(buf)
        except OSError:  # not a mapping mincore knows: copy from it as without a ring
            return None
        if all(res[first - lo:first - lo + n].count(0) == 0 for first, n in runs):
            return None
        return lo, res

    async def _place_pages(self, pages: list[int]) -> int:
        """A set chunk (sorted store pages): resident pages copied from the mapping, the
        others read with io_uring first; returns the pages placed."""
        if self.ring is None or not pages:
            return self._install_pages(pages)
        runs = self.plan.runs(pages)
        res = self._resident(runs)
        if res is None:  # all in the page cache (the warm case): as without a ring
            return self._install_pages(pages)
        return await self._place_split(runs, *res)

    async def _place_runs(self, runs: list[tuple[int, int]]) -> int:
        """A fill batch: like :meth:`_place_pages`, for runs."""
        if self.ring is None or not runs:
            return self._install_mapped(runs)
        res = self._resident(runs)
        if res is None:
            return self._install_mapped(runs)
        return await self._place_split(runs, *res)

    async def _place_split(self, runs: list[tuple[int, int]], lo: int, resident: bytes
                           ) -> int:
        """Runs partly out of the page cache: the resident pieces copied from the mapping,
        the others read with io_uring first (:meth:`_read_install`)."""
        warm, cold = split_runs(runs, lo, resident)
        placed = self._install_mapped(warm) if warm else 0
        return placed + await self._read_install(cold)

    async def _read_install(self, runs: list[tuple[int, int]]) -> int:
        """Read runs that are not in the page cache with io_uring READs into page-aligned
        buffers, then copy them from there; returns the pages placed.  Runs close together
        share a READ (:func:`read_extents`); the READs go out a buffer's worth
        (``read_budget`` pages) at a time, all in flight at once, and the next buffer's
        READs are in flight while one is copied and its own complete (two buffers): the
        loop serves faults meanwhile."""
        groups: list[tuple[list[tuple[int, int, list[tuple[int, int]]]], int]] = []
        group: list[tuple[int, int, list[tuple[int, int]]]] = []
        size = 0
        for ext in read_extents(runs, self.read_gap, self.read_max):
            if group and size + ext[1] > self.read_budget:
                groups.append((group, size))
                group, size = [], 0
            group.append(ext)
            size += ext[1]
        if group:
            groups.append((group, size))
        placed = 0
        pending: asyncio.Task[int] | None = None
        task: asyncio.Task[int] | None = None
        try:
            for i, (group, size) in enumerate(groups):
                # buffer i % 2: the group that used it last (i - 2) has been awaited
                task = asyncio.ensure_future(self._read_group(group, size, i % 2))
                if pending is not None:
                    placed += await pending
                pending, task = task, None
                if self._closed:
                    break
            if pending is not None:
                placed += await pending
                pending = None
        finally:  # cancelled (or a bug): the other group's READs go with us
            for t in (pending, task):
                if t is not None and not t.done():
                    t.cancel()
        return placed

    async def _read_group(self, group: list[tuple[int, int, list[tuple[int, int]]]],
                          size: int, slot: int) -> int:
        assert self.ring is not None and self.src_fd is not None
        ps = self.page_size
        m = self.metrics
        buf = self._rbufs[slot]
        if buf is None or len(buf) < size * ps:
            # page-aligned, as UFFDIO_COPY's source must be
            buf = self._rbufs[slot] = mmap.mmap(-1, size * ps)
        view = memoryview(buf)
        reads = []
        offs = []
        at = 0
        for first, n, _ in group:
            reads.append(self.ring.read(self.src_fd, view[at:at + n * ps], first * ps))
            offs.append(at)
            at += n * ps
        m.reads += len(reads)
        got = await asyncio.gather(*reads, return_exceptions=True)
        del view
        if self._closed:
            return 0
        base, keep = ll.buffer_address(buf)
        placed = 0
        since = 0  # pages copied since the last yield
        for (efirst, en, inner), off, r in zip(group, offs, got, strict=True):
            if since >= self.plan.chunk:  # real faults first: at most a chunk's copies
                await asyncio.sleep(0)
                since = 0
                if self._closed:
                    break
            since += en
            if isinstance(r, BaseException):
                if isinstance(r, asyncio.CancelledError):
                    raise r
                self._log.warning("uffd_aio.workingset_read_failed", page=efirst, pages=en,
                                  error=str(r))
                r = 0
            avail = r // ps  # pages of the extent read in full
            items: list[tuple[Target, int, int, int]] = []
            for first, n in inner:
                full = max(0, min(n, avail - (first - efirst)))
                m.deferred += n - full  # short read (truncated file): the fault path decides
                m.pages_read += full
                t = self._target(first)
                if t is None or t.gone or full == 0:
                    continue
                # pages the client discarded while the read was in flight stay discarded
                rm = t.removed
                src = base + off + (first - efirst) * ps
                start = 0
                for i in range(full + 1):
                    if i == full or (rm is not None and rm(first + i)):
                        if i > start:
                            items.append((t, first + start, i - start, src + start * ps))
                        start = i + 1
            placed += self._copy_triples(items)
        del keep
        return placed

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
        todo: list[tuple[Target, int, int, int]] = []
        for first, n in runs:
            t = self._target(first)
            if t is not None and not t.gone:
                todo.append((t, first, n, base + first * ps))
        return self._copy_triples(todo)

    def _copy_triples(self, todo: list[tuple[Target, int, int, int]]) -> int:
        """Copy ``(target, first, n, source address)`` runs, in one native call per uffd;
        returns the pages placed."""
        ps = self.page_size
        placed = 0
        while todo:
            fd = todo[0][0].fd
            batch = [x for x in todo if x[0].fd == fd]
            todo = [x for x in todo if x[0].fd != fd]
            triples = array("Q")
            for t, first, n, src in batch:
                triples.extend((t.address + (first - t.lo) * ps, src, n * ps))
            rc, (got, there, left, ioctls, stop) = ll.uffd_copy_runs(fd, triples, ps)
            m = self.metrics
            m.copies += ioctls
            m.already_present += there
            m.deferred += left
            placed += got
            for t, first, n, _ in batch[:stop]:
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
