"""The dispatch core (sans-io): decoded uffd messages in, decisions out.

Like h11 for HTTP, this module holds the pager's state machine and does no I/O:
no kernel, no event loop, no clock (times come in as arguments).  The
:class:`~uffd_aio.pager.Pager` reads messages, feeds them here and carries out
what comes back (runs handlers, executes :class:`~uffd_aio.ops.Op` resolutions
through :mod:`uffd_aio.resolver`).  Unit-tested with synthetic messages
(tests/unit/test_dispatch.py).

* :class:`Channel`: one uffd's table (extents -> regions, bisected) and its faults
  in flight, one record per page.
* :class:`Fault`: **the one record per fault**: the fields a handler reads
  (:class:`~uffd_aio.PageFault` is this class with the resolution methods) and
  the in-flight state the pager keeps (duplicates, resolved, the handler's task
  and timer, EAGAIN attempts).  No Event per fault: :class:`Dispatcher` counts.
* :class:`Dispatcher`: admission of a fault (stray, duplicate on a page in flight,
  a new fault on a page resolved explicitly but not finished = deferred, backlog
  past ``max_inflight``, or start), its finish, and the backlog's next fault.
* :meth:`Dispatcher.event`: FORK/REMAP/REMOVE/UNMAP bookkeeping on the table.
* Outcomes as values: :func:`default_op`, :func:`policy_ops` (poison/zero/raise),
  :func:`failure_outcome`, :func:`cancel_error` (handler_timeout), :func:`result_op`
  (a handler's returned buffer checked against page size and extent: a read-ahead
  window must end inside the region), :func:`check_range`, :func:`check_move`.
"""

from __future__ import annotations

import bisect
import enum
import os
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

import attrs

from uffd_aio import events as ev_mod
from uffd_aio.errors import BadHandlerResult, FeatureUnavailable, HandlerTimeout, PagerClosed
from uffd_aio.events import Fork, PageFaultMsg, Remap, Remove, Unmap
from uffd_aio.modes import Feature, feature_names
from uffd_aio.ops import Kind, Moved, Op, new_op, zero_source
from uffd_aio.stats import Counters

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from uffd_aio.uffd import Userfaultfd

ErrorPolicy = Literal["poison", "zero", "raise"]

BASE_PAGE = os.sysconf("SC_PAGE_SIZE")  # hugetlbfs pages are larger
_WRITE = ev_mod.PAGEFAULT_FLAG_WRITE
_WP = ev_mod.PAGEFAULT_FLAG_WP
_MINOR = ev_mod.PAGEFAULT_FLAG_MINOR


class RegionView(Protocol):
    """What the core reads of a :class:`~uffd_aio.Region` (a protocol: no import)."""

    @property
    def name(self) -> str: ...
    @property
    def page_size(self) -> int: ...
    @property
    def remote(self) -> bool: ...
    @property
    def memfd(self) -> int | None: ...
    @property
    def event_handlers(self) -> Sequence[Callable[[Fork | Remap | Remove | Unmap],
                                                  Awaitable[None] | None]]: ...
    def address_of(self, offset: int) -> int: ...


class ExplicitResolver(Protocol):
    """Executes a handler's explicit resolution (``await ev.copy(...)``): the pager's
    :class:`~uffd_aio.resolver.Resolver`.  Done when it returns an int."""

    def explicit(self, fault: Fault, op: Op) -> int | Awaitable[int]: ...


class Cancellable(Protocol):
    def cancel(self) -> object: ...


class Extent:
    """[start, end) of a uffd's address space maps to ``region`` at ``offset``."""

    __slots__ = ("end", "offset", "region", "start")

    def __init__(self, start: int, end: int, region: RegionView, offset: int) -> None:
        self.start, self.end, self.region, self.offset = start, end, region, offset

    def __repr__(self) -> str:
        return f"Extent({self.start:#x}-{self.end:#x} {self.region.name}+{self.offset:#x})"


class Channel:
    """One uffd being served: its extent table and its faults in flight (per page).

    ``uffd`` is the I/O side's handle (a :class:`~uffd_aio.uffd.Userfaultfd`), carried
    for the resolver and never touched here.  ``local``: the uffd belongs to this
    process (not a fork child's or a handed-over one), so UFFDIO_MOVE from our memory
    can reach it.  ``resolver`` runs the explicit resolutions of its faults.
    """

    __slots__ = ("extents", "features", "inflight", "local", "resolver", "starts",
                 "thread_ids", "uffd")

    def __init__(self, uffd: Userfaultfd, *, features: Feature = Feature(0),
                 local: bool = True, resolver: ExplicitResolver | None = None) -> None:
        self.uffd = uffd
        self.features = features
        self.thread_ids = bool(features & Feature.THREAD_ID)
        self.local = local
        self.resolver = resolver
        self.extents: list[Extent] = []
        self.starts: list[int] = []
        self.inflight: dict[int, Fault] = {}

    def add_extent(self, start: int, end: int, region: RegionView, offset: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.extents.insert(i, Extent(start, end, region, offset))

    def remove_range(self, start: int, end: int) -> list[Extent]:
        """Cut [start, end) out of the extents; returns the removed pieces."""
        kept: list[Extent] = []
        removed: list[Extent] = []
        for x in self.extents:
            if x.end <= start or x.start >= end:
                kept.append(x)
                continue
            if x.start < start:
                kept.append(Extent(x.start, start, x.region, x.offset))
            if x.end > end:
                kept.append(Extent(end, x.end, x.region, x.offset + (end - x.start)))
            lo, hi = max(x.start, start), min(x.end, end)
            removed.append(Extent(lo, hi, x.region, x.offset + (lo - x.start)))
        kept.sort(key=lambda e: e.start)
        self.extents = kept
        self.starts = [x.start for x in kept]
        return removed

    def remove_region(self, region: RegionView) -> list[Extent]:
        """Drop every extent of ``region`` (wherever REMAP moved it); returns them."""
        removed = [x for x in self.extents if x.region is region]
        if removed:
            self.extents = [x for x in self.extents if x.region is not region]
            self.starts = [x.start for x in self.extents]
        return removed

    def lookup(self, address: int) -> Extent | None:
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0:
            x = self.extents[i]
            if address < x.end:
                return x
        return None

    def overlapping(self, start: int, end: int) -> list[Extent]:
        return [x for x in self.extents if x.start < end and start < x.end]

    def inherit(self, parent: Channel) -> None:
        """A fork child's table: the parent's extents, same regions and offsets."""
        for x in parent.extents:
            self.add_extent(x.start, x.end, x.region, x.offset)

    def page_size_at(self, address: int) -> int:
        x = self.lookup(address)
        return BASE_PAGE if x is None else x.region.page_size


class Fault:
    """One fault, from its message to its resolution: the record the whole path shares.

    The fields a handler reads (documented on :class:`~uffd_aio.PageFault`, which is
    this class with the resolution methods) and the in-flight state the pager keeps.
    ``offset`` and ``end`` are set when the fault starts (a backlogged fault's extent
    may move meanwhile).  Duplicates of the page only count (``dups``).
    """

    __slots__ = (
        # what the handler sees
        "address",
        # in flight
        "attempts",
        "channel",
        "dups",
        "end",
        "is_minor",
        "is_wp",
        "is_write",
        "offset",
        "page",
        "page_size",
        "region",
        "resolved",
        "resolving",
        "running",
        "t0",
        "task",
        "thread_id",
        "timed_out",
        "timer",
    )

    address: int
    page: int
    offset: int
    page_size: int
    region: RegionView  # a uffd_aio.Region
    is_write: bool
    is_wp: bool
    is_minor: bool
    thread_id: int | None

    def __init__(self, address: int, page: int, region: RegionView, flags: int,
                 thread_id: int | None, channel: Channel, t0: int = 0) -> None:
        self.address = address
        self.page = page
        self.offset = 0
        self.page_size = region.page_size
        self.region = region
        self.is_write = flags & _WRITE != 0
        self.is_wp = flags & _WP != 0
        self.is_minor = flags & _MINOR != 0
        self.thread_id = thread_id
        self.channel = channel
        self.t0 = t0
        self.dups = 0
        #: resolved explicitly (ev.copy...): the handler's return value is ignored
        self.resolved = False
        #: a resolution covering the page went to the ring (a write not completed
        #: yet): the kernel may have woken the thread already, which may fault again
        self.resolving = False
        self.running = False  # counted in Dispatcher.running (its handler started)
        self.task: Cancellable | None = None  # the handler's Task, if it suspended
        self.timer: Cancellable | None = None  # handler_timeout
        self.timed_out = False
        self.attempts = 0  # EAGAIN retries of its resolution
        self.end = 0  # end of its extent when it started

    @property
    def is_missing(self) -> bool:
        return not (self.is_wp or self.is_minor)

    @property
    def page_address(self) -> int:
        """The faulting page's address (the same as :attr:`page`, under a clearer name)."""
        return self.page

    def __repr__(self) -> str:
        kind = "wp" if self.is_wp else "minor" if self.is_minor else "missing"
        rw = "write" if self.is_write else "read"
        return (f"PageFault({kind} {rw} at {self.address:#x}, region={self.region.name!r}, "
                f"offset={self.offset:#x}, tid={self.thread_id})")


class Outcome(enum.Enum):
    """What :meth:`Dispatcher.admit` decided when it did not start a fault."""

    STRAY = "stray"  # no region: the error policy applies to the page
    DUPLICATE = "duplicate"  # another thread on a page in flight: counted, woken with it
    DEFERRED = "deferred"  # the page was resolved but its handler runs on: after it
    QUEUED = "queued"  # max_inflight reached: in the backlog


class Dispatcher:
    """Admission and bookkeeping of faults: who runs, who waits, who is a duplicate.

    ``make`` builds the record (the pager passes :class:`~uffd_aio.PageFault`).
    ``running`` counts started faults (handlers running or resolutions pending);
    ``idle`` is what closing waits for.
    """

    __slots__ = ("backlog", "counters", "deferred", "make", "max_inflight", "running")

    def __init__(self, counters: Counters, max_inflight: int,
                 make: Callable[[int, int, RegionView, int, int | None, Channel, int],
                                Fault] = Fault) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.counters = counters
        self.max_inflight = max_inflight
        self.make = make
        self.running = 0
        self.backlog: deque[Fault] = deque()
        #: new faults on a page whose fault was resolved but not finished
        self.deferred: dict[Fault, list[PageFaultMsg]] = {}

    @property
    def idle(self) -> bool:
        return self.running == 0 and not self.backlog

    def admit(self, ch: Channel, msg: PageFaultMsg, now: int = 0) -> Fault | Outcome:
        """A page-fault message: the fault to start now (counted running, ``offset``
        set), or why not."""
        c = self.counters
        c.faults += 1
        x = ch.lookup(msg.address)
        if x is None:
            c.errors += 1
            return Outcome.STRAY
        region = x.region
        page = msg.address & ~(region.page_size - 1)
        f = ch.inflight.get(page)
        if f is not None:
            if f.resolved or f.resolving:
                # Resolved explicitly (ev.copy...), its handler not finished yet: the
                # faulting thread was already woken, so this is a NEW fault on the page
                # (say a write after a read resolved write-protected), not a duplicate.
                # Dropping it would leave the thread asleep: run it after this one.
                self.deferred.setdefault(f, []).append(msg)
                return Outcome.DEFERRED
            f.dups += 1
            c.duplicate_faults += 1
            return Outcome.DUPLICATE
        f = self.make(msg.address, page, region, msg.flags,
                      msg.thread_id if ch.thread_ids else None, ch, now)
        ch.inflight[page] = f
        if self.running >= self.max_inflight:
            self.backlog.append(f)
            return Outcome.QUEUED
        self.running += 1
        f.running = True
        f.offset = x.offset + (page - x.start)
        f.end = x.end
        return f

    def next_ready(self) -> Fault | None:
        """The backlog's next fault that may start now (counted running), if any.
        Faults whose range went away while they waited leave quietly."""
        backlog = self.backlog
        while backlog and self.running < self.max_inflight:
            f = backlog.popleft()
            ch = f.channel
            if ch.inflight.get(f.page) is not f:
                continue
            x = ch.lookup(f.page)
            if x is None:  # unmapped while it waited
                del ch.inflight[f.page]
                continue
            self.running += 1
            f.running = True
            f.offset = x.offset + (f.page - x.start)
            f.end = x.end
            return f
        return None

    def finish(self, f: Fault, now: int = 0) -> bool:
        """``f`` leaves flight (its page may fault anew); False if it had left."""
        ch = f.channel
        if ch.inflight.get(f.page) is not f:
            return False
        del ch.inflight[f.page]
        if f.running:
            f.running = False
            self.running -= 1
            self.counters.latency.record(now - f.t0)
        return True

    def take_deferred(self, f: Fault) -> list[PageFaultMsg]:
        """The faults that arrived on ``f``'s page after it was resolved: dispatch them
        again now (they are not counted twice)."""
        later = self.deferred.pop(f, None) if self.deferred else None
        if not later:
            return []
        self.counters.faults -= len(later)
        return later

    def event(self, ch: Channel, msg: ev_mod.Msg) -> list[RegionView] | None:
        """Apply a non-fault event to ``ch``'s table; the regions whose handlers see it
        (None: an unknown event).  FORK only counts: following it (a new channel that
        :meth:`Channel.inherit`\\ s this one) is the caller's."""
        c = self.counters
        c.events += 1
        if isinstance(msg, Fork):
            c.forks += 1
            return []
        if isinstance(msg, Remap):
            c.remaps += 1
            moved = ch.remove_range(msg.old, msg.old + msg.length)
            for x in moved:
                delta = x.start - msg.old
                ch.add_extent(msg.new + delta, msg.new + delta + (x.end - x.start), x.region,
                              x.offset)
            return [x.region for x in moved]
        if isinstance(msg, Remove):
            c.removes += 1
            return [x.region for x in ch.overlapping(msg.start, msg.end)]
        if isinstance(msg, Unmap):
            c.unmaps += 1
            regions = [x.region for x in ch.overlapping(msg.start, msg.end)]
            ch.remove_range(msg.start, msg.end)
            return regions
        return None


# ---- resolutions and outcomes as values ------------------------------------------------


def zero_op(address: int, length: int, page_size: int) -> Op:
    """Zero pages; on hugetlbfs (no UFFDIO_ZEROPAGE there) a copy from a zero buffer."""
    if page_size == BASE_PAGE:
        return Op(Kind.ZERO, address, length)
    return Op(Kind.ZERO, address, length, zero_source(length))


def default_op(f: Fault) -> Op:
    """A handler returned None: a zero page (MISSING), unprotect (WP), continue (MINOR)."""
    if f.is_wp:
        return Op(Kind.UNPROTECT, f.page, f.page_size)
    if f.is_minor:
        return Op(Kind.CONTINUE, f.page, f.page_size)
    return zero_op(f.page, f.page_size, f.page_size)


def policy_ops(policy: ErrorPolicy, *, is_wp: bool, is_minor: bool, page: int,
               size: int) -> list[Op]:
    """The error policy for a page whose handler failed, as alternatives: the first
    that works is enough (POISON is not available everywhere).  WP faults are
    unprotected whatever the policy (the data is there, poisoned first unless
    ``zero``); MINOR faults are poisoned then continued."""
    if is_wp:
        ops = [Op(Kind.UNPROTECT, page, size)]
        if policy != "zero":
            ops.insert(0, Op(Kind.POISON, page, size))
        return ops
    if is_minor:
        return [Op(Kind.POISON, page, size), Op(Kind.CONTINUE, page, size)]
    if policy == "zero":
        return [zero_op(page, size, size)]
    return [Op(Kind.POISON, page, size), zero_op(page, size, size)]


@attrs.frozen(slots=True)
class FailureOutcome:
    """What a handler failure leads to.  ``error``: count and log it as an error;
    ``policy``: apply :func:`policy_ops` to the page; ``record``: it becomes the
    pager's failure (``on_error="raise"``); ``stop``: close the pager."""

    error: bool
    policy: bool
    record: bool
    stop: bool


def failure_outcome(policy: ErrorPolicy, *, gone: bool, abandon: bool, resolved: bool,
                    closing: bool, failed_before: bool) -> FailureOutcome:
    """A handler failed (``gone``: because the range or the process went away)."""
    if abandon:  # closing for a successor, which re-raises the fault (WAKE)
        return FailureOutcome(error=False, policy=False, record=False, stop=False)
    if gone:  # the process exited or dropped the range: no error
        return FailureOutcome(error=False, policy=not resolved, record=False, stop=False)
    raising = policy == "raise"
    return FailureOutcome(error=True, policy=not resolved, record=raising and not failed_before,
                          stop=raising and not closing)


def cancel_error(f: Fault, *, closing: bool, timeout: float | None) -> BaseException | None:
    """Why a handler's task was cancelled: its ``handler_timeout`` (``f.timed_out``),
    the pager closing, or (None) someone else: the caller's CancelledError."""
    if f.timed_out:
        return HandlerTimeout(f"handler for {f!r} exceeded {timeout} s")
    if closing:
        return PagerClosed("pager closed while the handler ran")
    return None


def result_op(f: Fault, result: ReadableBuffer) -> Op:
    """The COPY for the bytes a handler returned, checked: only MISSING faults take
    data, a non-zero multiple of the page size, and a read-ahead window must end
    inside the extent the fault is in (raises :class:`BadHandlerResult`)."""
    if f.is_wp or f.is_minor:
        kind = "write-protect" if f.is_wp else "minor"
        raise BadHandlerResult(
            f"handler for a {kind} fault at {f.page:#x} returned data; the page is "
            f"already present: return None (or await ev.unprotect()/ev.continue_())")
    try:
        view = memoryview(result).cast("B")
    except TypeError:
        raise BadHandlerResult(
            f"handler for {f!r} returned {type(result).__name__}; expected a "
            f"bytes-like object or None") from None
    n = view.nbytes
    ps = f.page_size
    if n == 0 or n % ps:
        raise BadHandlerResult(
            f"handler for {f!r} returned {n} bytes; expected a non-zero multiple "
            f"of the page size ({ps})")
    if f.task is None:  # ran eagerly to the end: the extent seen at its start still holds
        end: int | None = f.end
    else:
        x = f.channel.lookup(f.page)
        end = None if x is None else x.end
    if end is not None and f.page + n > end:
        raise BadHandlerResult(
            f"handler for {f!r} returned {n} bytes, which run "
            f"{f.page + n - end} bytes past the end of {f.region!r}")
    return new_op(Kind.COPY, f.page, n, view, False)


def moved_op(f: Fault, moved: Moved) -> Op:
    """The MOVE for a handler's :class:`~uffd_aio.Moved`, checked."""
    n = f.page_size if moved.length is None else moved.length
    check_move(f, f.page, n, moved)
    return Op(Kind.MOVE, f.page, n, moved)


def check_range(f: Fault, start: int, length: int, *, what: str) -> None:
    """An explicit resolution of ``f`` must cover whole pages of its extent."""
    ps = f.page_size
    if length <= 0 or length % ps or start % ps:
        raise BadHandlerResult(f"{what} of {length} bytes at {start:#x}: address and "
                               f"length must be non-zero multiples of the page size {ps}")
    x = f.channel.lookup(start)
    if x is None or start + length > x.end:
        raise BadHandlerResult(f"{what} {start:#x}+{length:#x} is outside {f.region!r}")


def check_move(f: Fault, dst: int, length: int, moved: Moved) -> None:
    """What UFFDIO_MOVE needs that we can tell before asking the kernel."""
    region = f.region
    ch = f.channel
    if f.is_wp or f.is_minor:
        raise BadHandlerResult(f"move for {f!r}: MOVE fills missing pages; this "
                               f"page is present (return None, or unprotect/continue)")
    if region.remote or not ch.local:
        raise BadHandlerResult(
            f"move for {f!r}: UFFDIO_MOVE moves pages inside the address space "
            f"that owns the uffd, and {region!r} is another process's memory (a handed-"
            f"over uffd or a fork child): copy the data instead")
    if not ch.features & Feature.MOVE:
        raise FeatureUnavailable(["MOVE"], available=feature_names(ch.features),
                                 what="ev.move / uffd_aio.Moved (Linux 6.8+)")
    if region.memfd is not None or region.page_size != BASE_PAGE:
        raise BadHandlerResult(
            f"move into {region!r}: UFFDIO_MOVE works only on private anonymous memory "
            f"with base pages (not shmem or hugetlbfs): copy instead")
    src = moved.src
    if not isinstance(src, int) or src <= 0 or src % BASE_PAGE:
        raise BadHandlerResult(f"move source {src!r} must be a page-aligned address")
    check_range(f, dst, length, what="move")
    if src < dst + length and dst < src + length:
        raise BadHandlerResult(f"move source {src:#x}+{length:#x} overlaps the "
                               f"destination {dst:#x}")


def count_op(c: Counters, kind: Kind) -> None:
    """Count one resolution of ``kind`` (the batched, explicit and policy paths)."""
    if kind is Kind.COPY:
        c.copies += 1
    elif kind is Kind.ZERO:
        c.zeropages += 1
    elif kind is Kind.CONTINUE:
        c.continues += 1
    elif kind is Kind.UNPROTECT:
        c.unprotects += 1
    elif kind is Kind.POISON:
        c.poisons += 1
    elif kind is Kind.MOVE:
        c.moves += 1
    else:
        c.wakes += 1

