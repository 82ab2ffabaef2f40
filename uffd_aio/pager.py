"""Pager: serves the faults of one or more uffds on the running event loop.

Data flow of a fault: the outstanding io_uring read on the uffd completes ->
the ring reaps the CQE batch (one C call) -> :mod:`uffd_aio.events` decodes
it -> the fault is mapped to its region and deduplicated per page -> the
handler runs (eagerly: no Task unless it really suspends) -> the resolution
is queued, contiguous ones are merged at the end of the batch and executed by
the backend (:mod:`uffd_aio.resolve`) -> the faulting thread resumes.
"""

from __future__ import annotations

import asyncio
import bisect
import errno as E
import functools
import inspect
import os
import time
import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import Any, Literal

import attrs

from uffd_aio import events as ev_mod
from uffd_aio import hugepages
from uffd_aio.errors import (
    BadHandlerResult,
    FeatureUnavailable,
    MoveError,
    PagerClosed,
    ResolveError,
    UffdError,
)
from uffd_aio.events import Fork, PageFaultMsg, Remap, Remove, UnknownMsg, Unmap
from uffd_aio.fault import PageFault
from uffd_aio.log import get_logger
from uffd_aio.modes import DEFAULT_FEATURES, Feature, Mode, feature_names
from uffd_aio.region import EventHandler, Region
from uffd_aio.resolve import (
    Backend,
    IoctlBackend,
    Kind,
    Moved,
    Op,
    _copy_buf,
    _from_buffer,
    covering,
    merge,
    zero_source,
)
from uffd_aio.ring import Ring
from uffd_aio.ring import _lowlevel as ll
from uffd_aio.ring._engine import Engine, EngineStats
from uffd_aio.stats import Counters, PagerStats
from uffd_aio.uffd import (
    EAGAIN_MAX_RETRIES,
    EAGAIN_RETRY_INTERVAL,
    PAGE_SIZE,
    MmChanging,
    RangeGone,
    Userfaultfd,
    retry_while_mm_changing,
)

ErrorPolicy = Literal["poison", "zero", "raise"]
BackendName = Literal["auto", "ioctl", "ring"]
ReadMode = Literal["auto", "multishot", "read", "poll"]

_READ_BATCH = 64  # uffd_msg per read
_READ_ON = 16  # direct reads after a dispatched batch before re-arming the ring read
_NATIVE_SLOT_BYTES = 256 * 1024  # native engine: one io_uring READ of page-cache misses
_CoroType = types.CoroutineType
_WRITE = ev_mod.PAGEFAULT_FLAG_WRITE
_WP = ev_mod.PAGEFAULT_FLAG_WP
_MINOR = ev_mod.PAGEFAULT_FLAG_MINOR


_STALL_MESSAGE = """
uffd_aio: pager {name!r} (pid {pid}): page faults have waited {timeout:g} s for an event
loop that does not run.  Most likely a Python thread touched memory registered with this
pager while holding the GIL: that thread sleeps in the kernel until the fault is resolved,
and the pager needs the GIL to resolve it, so the process is deadlocked.  Touch registered
memory from native code that releases the GIL (uffd_aio.testing, C extensions) or from
another process; never from Python code or on the loop thread.  The same happens when the
loop thread calls fork() (subprocesses too), mremap(), munmap() or madvise() on registered
memory, when any thread forks through glibc's fork() (it holds malloc's locks until the
pager has read the FORK event; use _Fork(), posix_spawn, or leave EVENT_FORK out), or a
handler blocks the loop this long.  See docs/gil.md.  To see which thread: run with
PYTHONFAULTHANDLER=1 and send SIGABRT, or py-spy dump --pid {pid}.
"""


def _slot_constructor(cls: type[Any]) -> Callable[..., Any]:
    """``cls(*fields)`` for a frozen attrs class without validators, converters or
    defaults to apply: the slots' setters called directly, instead of the generated
    frozen ``__init__`` that goes through ``object.__setattr__`` per field.  Built for
    the two records made per fault (PageFault, Op); same objects, ~half the cost."""
    fields = attrs.fields(cls)
    if any(a.validator is not None or a.converter is not None for a in fields):
        raise TypeError(f"{cls.__name__} has validators/converters")
    setters = tuple(cls.__dict__[a.name].__set__ for a in fields)  # slot descriptors
    new = object.__new__
    n = len(setters)

    if n == 10:
        s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = setters

        def make10(a0: Any, a1: Any, a2: Any, a3: Any, a4: Any, a5: Any, a6: Any, a7: Any,
                   a8: Any, a9: Any) -> Any:
            o = new(cls)
            s0(o, a0); s1(o, a1); s2(o, a2); s3(o, a3); s4(o, a4)  # noqa: E702
            s5(o, a5); s6(o, a6); s7(o, a7); s8(o, a8); s9(o, a9)  # noqa: E702
            return o

        return make10
    if n == 5:
        t0, t1, t2, t3, t4 = setters

        def make5(a0: Any, a1: Any, a2: Any, a3: Any, a4: Any) -> Any:
            o = new(cls)
            t0(o, a0); t1(o, a1); t2(o, a2); t3(o, a3); t4(o, a4)  # noqa: E702
            return o

        return make5
    raise TypeError(f"no fast constructor for {n} fields")


_new_fault: Callable[..., PageFault] = _slot_constructor(PageFault)
_new_op: Callable[..., Op] = _slot_constructor(Op)


class PagerFailed(UffdError):
    """A handler failed under ``on_error="raise"``; the pager stopped serving."""


class HandlerTimeout(UffdError, TimeoutError):
    """A fault handler ran longer than ``handler_timeout``."""


class _Resume:
    """Continue a coroutine that was started eagerly, inside a real Task.

    The Task drives this generator; we forward sends and throws to the
    original coroutine, so its awaits (and cancellation) behave as if it had
    been a Task from the start.
    """

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[Any, None, Any]:
        coro, value = self.coro, self.first
        while True:
            try:
                yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(None)
                except StopIteration as stop:
                    return stop.value


async def _resume(coro: Coroutine[Any, Any, Any], first: Any) -> Any:
    return await _Resume(coro, first)


def _count_op(c: Counters, kind: Kind) -> None:
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


class _Extent:
    """[start, end) of a uffd context maps to ``region`` at ``offset``."""

    __slots__ = ("end", "offset", "region", "start")

    def __init__(self, start: int, end: int, region: Region, offset: int) -> None:
        self.start, self.end, self.region, self.offset = start, end, region, offset


class _Context:
    """One uffd being served: the pager's own, a fork child's, or a handed-off one."""

    def __init__(self, pager: Pager, uffd: Userfaultfd, label: str) -> None:
        self.pager = pager
        self.uffd = uffd
        self.label = label
        self.extents: list[_Extent] = []
        self.starts: list[int] = []
        self.inflight: dict[int, _Inflight] = {}
        self.read_ud: int | None = None
        self.read_cb: Callable[[int, int], None] | None = None  # made once, re-armed often
        self.read_mode: ReadMode = "read"
        self.buf = bytearray(ev_mod.MSG_SIZE * _READ_BATCH)
        self.buf_addr, self._buf_keep = ll.buffer_address(self.buf, writable=True)
        self.bufring: ll.BufRing | None = None
        self.reading = False
        self.errors_in_row = 0
        self.thread_ids = uffd.has(Feature.THREAD_ID)
        self.engine: Engine | None = None  # native fault engine (region.serve_from)
        self.engine_up: bytearray | None = None  # what its completions pass up (take)

    def add_extent(self, start: int, end: int, region: Region, offset: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.extents.insert(i, _Extent(start, end, region, offset))

    def remove_range(self, start: int, end: int) -> list[_Extent]:
        """Cut [start, end) out of the extents; returns the removed pieces."""
        kept: list[_Extent] = []
        removed: list[_Extent] = []
        for x in self.extents:
            if x.end <= start or x.start >= end:
                kept.append(x)
                continue
            if x.start < start:
                kept.append(_Extent(x.start, start, x.region, x.offset))
            if x.end > end:
                kept.append(_Extent(end, x.end, x.region, x.offset + (end - x.start)))
            lo, hi = max(x.start, start), min(x.end, end)
            removed.append(_Extent(lo, hi, x.region, x.offset + (lo - x.start)))
        kept.sort(key=lambda e: e.start)
        self.extents = kept
        self.starts = [x.start for x in kept]
        return removed

    def lookup(self, address: int) -> _Extent | None:
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0:
            x = self.extents[i]
            if address < x.end:
                return x
        return None


class _Inflight:
    """A fault being handled (one per page per context; duplicates only count)."""

    __slots__ = (
        "attempts",
        "ctx",
        "dups",
        "end",
        "fault",
        "msg",
        "page",
        "page_size",
        "pager",
        "region",
        "resolved",
        "resolving",
        "t0",
        "task",
        "timed_out",
        "timer",
    )

    def __init__(self, pager: Pager, ctx: _Context, msg: PageFaultMsg, region: Region,
                 page: int) -> None:
        self.pager = pager
        self.ctx = ctx
        self.msg = msg
        self.region = region
        self.page = page
        self.page_size = region.page_size
        self.t0 = time.perf_counter_ns()
        self.dups = 0
        self.resolved = False
        # a resolution covering the page went to the ring (a write not completed yet):
        # the kernel may already have woken the thread, which may fault again
        self.resolving = False
        self.task: asyncio.Task[Any] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = False
        self.attempts = 0
        self.fault: PageFault | None = None
        self.end = 0  # end of the extent the fault was in, when its handler started


def _op_address(item: tuple[_Inflight | None, Op, _Context]) -> int:
    return item[1].address


def _default_op(inf: _Inflight) -> Op:
    msg = inf.msg
    if msg.is_wp:
        return Op(Kind.UNPROTECT, inf.page, inf.page_size)
    if msg.is_minor:
        return Op(Kind.CONTINUE, inf.page, inf.page_size)
    return zero_op(inf.page, inf.page_size, inf.page_size)


def zero_op(address: int, length: int, page_size: int) -> Op:
    """Zero pages; on hugetlbfs (no UFFDIO_ZEROPAGE there) a copy from a zero buffer."""
    if page_size == PAGE_SIZE:
        return Op(Kind.ZERO, address, length)
    return Op(Kind.ZERO, address, length, zero_source(length))


def _page_size_at(ctx: _Context, address: int) -> int:
    x = ctx.lookup(address)
    return PAGE_SIZE if x is None else x.region.page_size


class Pager:
    """Serve page faults with asyncio handlers.

    ``async with Pager() as pager`` opens a uffd and an io_uring on the
    running loop.  Options:

    * ``features`` / ``required``: uffd features to ask for when available /
      to insist on (:class:`FeatureUnavailable` names what is missing).
    * ``uffd``: serve a uffd made elsewhere (e.g. handed over by a VMM).
    * ``ring``: share one :class:`Ring` between pagers (default: own one).
    * ``max_inflight``: handlers running at once; further faults wait.
    * ``handler_timeout``: seconds before a handler counts as failed.
    * ``on_error``: ``"poison"`` (the faulting thread gets SIGBUS),
      ``"zero"`` (a zero page) or ``"raise"`` (poison, then stop the pager and
      raise :class:`PagerFailed` from ``async with``/``wait_closed``).
    * ``backend``: ``"auto"``, ``"ioctl"``, or ``"ring"`` (patched kernels).
    * ``poll``: ask the patched kernel's poll mode (faulting threads spin
      before they sleep); ``poll_budget_us``: the spin budget (0..10000 us,
      default: the kernel's ``vm.userfaultfd_poll_budget_us``; implies ``poll``).
      Set with UFFDIO_POLL, so it works on handed-over uffds too.
    * ``eager``: run handlers inline until they first suspend (default).
    * ``follow_forks``: serve children's uffds after fork (EVENT_FORK).
    * ``close_timeout``: how long closing waits for running handlers.
    * ``stall_warning``: seconds after which a native watchdog writes to stderr
      that faults wait while the loop is stuck (typically a Python thread that
      touched registered memory holding the GIL: docs/gil.md); None disables.
    * ``native_reads`` / ``native_budget_us``: after a batch the native engine
      served entirely (``region.serve_from``), it reads the uffd again in C at
      most ``native_reads`` times and, with a budget, keeps polling an empty
      uffd (yielding the CPU) for up to ``native_budget_us`` before returning
      to the loop (0: return as soon as the uffd is empty).
    * ``native_read_slots``: buffers (256 KiB each) the native engine reads
      page-cache misses of file sources into, with io_uring READs on the
      pager's ring, copying in C when they complete; 0 passes misses up to the
      Python fallback instead.
    """

    def __init__(
        self,
        *,
        features: Feature | int = DEFAULT_FEATURES,
        required: Feature | int = Feature(0),
        uffd: Userfaultfd | None = None,
        ring: Ring | None = None,
        max_inflight: int = 1024,
        handler_timeout: float | None = None,
        on_error: ErrorPolicy = "poison",
        backend: BackendName = "auto",
        poll: bool = False,
        poll_budget_us: float | None = None,
        eager: bool = True,
        follow_forks: bool = True,
        read_mode: ReadMode = "auto",
        close_timeout: float = 5.0,
        stall_warning: float | None = 10.0,
        native_reads: int = 16,
        native_budget_us: float = 0.0,
        native_read_slots: int = 16,
        name: str = "pager",
    ) -> None:
        if on_error not in ("poison", "zero", "raise"):
            raise ValueError(f"on_error must be 'poison', 'zero' or 'raise', not {on_error!r}")
        if backend not in ("auto", "ioctl", "ring"):
            raise ValueError(f"backend must be 'auto', 'ioctl' or 'ring', not {backend!r}")
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.name = name
        self._features = Feature(features)
        self._required = Feature(required)
        if poll_budget_us is not None and not 0 <= poll_budget_us <= 10_000:
            raise ValueError(f"poll_budget_us must be in 0..10000, not {poll_budget_us!r}")
        poll = poll or bool(poll_budget_us)
        self._poll = poll
        self._poll_budget_us = poll_budget_us
        self._poll_budget_ns = 0
        if poll:
            self._features |= Feature.POLL
            self._required |= Feature.POLL
        if backend != "ioctl":  # a capability bit: asking is a no-op, and shows in .features
            self._features |= Feature.WRITE
        if backend == "ring":
            self._required |= Feature.WRITE
        self._given_uffd = uffd
        self._given_ring = ring
        self._max_inflight = max_inflight
        self._handler_timeout = handler_timeout
        self._on_error: ErrorPolicy = on_error
        self._backend_choice: BackendName = backend
        self._eager = eager
        self._follow_forks = follow_forks
        self._read_mode_choice: ReadMode = read_mode
        self._close_timeout = close_timeout
        if stall_warning is not None and stall_warning <= 0:
            raise ValueError("stall_warning must be positive or None")
        self._stall_warning = stall_warning
        if native_reads < 0 or not 0 <= native_budget_us <= 10_000:
            raise ValueError("native_reads must be >= 0 and native_budget_us in 0..10000")
        self._native_reads = native_reads
        self._native_budget_ns = int(native_budget_us * 1000)
        if not 0 <= native_read_slots <= 1024:
            raise ValueError("native_read_slots must be in 0..1024")
        self._native_read_slots = native_read_slots
        self._native_hooked = False
        #: regions served by the native engine -> (context, engine region id, source)
        self._native: dict[Region, tuple[_Context, int, Any]] = {}
        self._native_retired = EngineStats()  # counters of engines already freed
        self._log = get_logger(component="pager", pager=name)
        self._counters = Counters()
        self._contexts: list[_Context] = []
        self._main: _Context | None = None
        self._regions: list[Region] = []
        self._event_handlers: list[EventHandler] = []
        self._running = 0
        self._backlog: deque[_Inflight] = deque()
        self._pending: list[tuple[_Inflight | None, Op, _Context]] = []
        self._in_batch = False
        # a batch of one message on a synchronous backend: _complete executes its op at
        # once (nothing to merge it with), skipping the queue and the flush
        self._solo = False
        self._ring_backend = False
        self._ioctl_backend: IoctlBackend | None = None  # the direct copy's (_complete)
        self._flush_scheduled = False
        self._started = False
        self._closing = False
        self._abandon = False  # aclose(abandon_inflight=True): a successor takes the uffd
        self._closed = asyncio.Event()
        # aclose waits for _running == 0 and no backlog: a future made only then (an
        # Event cleared and set per fault cost more than the counts it mirrored)
        self._idle_waiter: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ring: Ring | None = None
        self._backend: Backend = IoctlBackend()
        self._sync_backend: Backend = self._backend  # resolutions done when execute returns
        self._warned_default = False
        #: new faults on a page whose inflight was resolved but not finished (_on_fault)
        self._deferred: dict[_Inflight, list[PageFaultMsg]] = {}

    # ---- lifecycle -------------------------------------------------------

    async def __aenter__(self) -> Pager:
        self.start()
        return self

    async def __aexit__(self, et: object, exc: BaseException | None, tb: object) -> None:
        await self.aclose()
        if self._failure is not None and exc is None:
            raise PagerFailed(f"pager {self.name!r} stopped: {self._failure!r}") from self._failure

    def start(self) -> None:
        """Open the uffd and the ring on the running loop (``async with`` does this)."""
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        self._ring = self._given_ring or Ring(loop=self._loop)
        try:
            uffd = self._given_uffd or Userfaultfd.open(self._features, required=self._required)
            self._backend = self._make_backend(uffd)
            self._sync_backend = getattr(self._backend, "sync", self._backend)
            self._ring_backend = self._backend.name == "ring"
            if type(self._backend) is IoctlBackend:
                self._ioctl_backend = self._backend
            if self._poll:
                self._start_polling(uffd)
            self._main = self._add_context(uffd, "main")
        except BaseException:
            if self._given_ring is None:
                self._ring.close()
            raise
        self._started = True
        if self._stall_warning is not None and self._given_ring is None:  # ring dies with us
            self._ring.start_watchdog(self._stall_warning, _STALL_MESSAGE.format(
                name=self.name, pid=os.getpid(), timeout=self._stall_warning),
                uffd=uffd.fd)
        self._log.info("uffd_aio.pager_started", uffd=uffd.fd, ring_fd=self._ring.fd,
                       backend=self._backend.name, read_mode=self._main.read_mode,
                       poll_budget_ns=self._poll_budget_ns,
                       loop=type(self._loop).__module__)

    def _make_backend(self, uffd: Userfaultfd) -> Backend:
        choice = self._backend_choice
        if choice == "ioctl":
            return IoctlBackend()
        from uffd_aio import resolve_ring  # patched kernels: io_uring writes on the uffd

        if choice == "auto" and not resolve_ring.write_path_available(uffd):
            return IoctlBackend()
        assert self._ring is not None
        try:
            return resolve_ring.RingWriteBackend.create(self._ring, uffd)
        except (UffdError, OSError) as exc:
            if choice == "ring":
                raise
            self._log.warning("uffd_aio.ring_backend_unavailable", error=str(exc))
            return IoctlBackend()

    def _start_polling(self, uffd: Userfaultfd) -> None:
        from uffd_aio import resolve_ring

        us = self._poll_budget_us
        if us is None:
            us = resolve_ring.read_poll_sysctl()
        ns = int((20 if us is None else us) * 1000)
        old = resolve_ring.set_poll_budget(uffd, ns)
        self._poll_budget_ns = ns
        self._log.debug("uffd_aio.poll_mode", uffd=uffd.fd, budget_ns=ns, old_budget_ns=old)

    @property
    def poll_budget_ns(self) -> int:
        """The faulting threads' spin budget set on the uffd (0: poll mode off)."""
        return self._poll_budget_ns

    @property
    def ring(self) -> Ring:
        if self._ring is None:
            raise RuntimeError("pager not started: use 'async with Pager() as pager'")
        return self._ring

    @property
    def uffd(self) -> Userfaultfd:
        if self._main is None:
            raise RuntimeError("pager not started: use 'async with Pager() as pager'")
        return self._main.uffd

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def features(self) -> Feature:
        return self.uffd.features

    @property
    def regions(self) -> list[Region]:
        return list(self._regions)

    @property
    def stats(self) -> PagerStats:
        c = self._counters
        ioctls = getattr(self._backend, "ioctls", 0)
        c.ioctls = ioctls
        c.ring_writes = getattr(self._backend, "ring_writes", 0)
        c.pwrites = getattr(self._backend, "pwrites", 0)
        snap = c.snapshot(inflight=self._running, backlog=len(self._backlog),
                          backend=self._backend.name)
        return self._native_stats(snap)

    async def wait_closed(self) -> None:
        """Wait until the pager is closed; raises PagerFailed after an ``on_error="raise"``."""
        await self._closed.wait()
        if self._failure is not None:
            raise PagerFailed(f"pager {self.name!r} stopped: {self._failure!r}") from self._failure

    async def aclose(self, *, abandon_inflight: bool = False) -> None:
        """Drain running handlers (bounded by close_timeout), then release everything.

        After close the kernel no longer routes faults to us: memory that was
        registered behaves as plain memory again, and owned mappings are unmapped.

        Faults still in flight after ``close_timeout`` get the error policy, so no
        thread reads memory that was never filled.  ``abandon_inflight=True`` is for a
        uffd that lives on in another server (``serve --takeover``, which keeps its own
        copy of the fd and WAKEs every range after taking over): those faults are left
        unresolved instead, and their threads fault again for the successor.
        """
        if not self._started or self._closed.is_set():
            return
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self._abandon = abandon_inflight
        try:
            await asyncio.wait_for(self._wait_idle(), self._close_timeout)
        except TimeoutError:
            self._log.warning("uffd_aio.close_timeout", inflight=self._running,
                              backlog=len(self._backlog))
        # Whatever is still in flight gets the error policy now, and it is finished
        # before anything below: unregistering a range or closing the uffd wakes its
        # waiting threads, which then read the memory as if it had never been
        # registered (zeros) instead of getting SIGBUS.
        await self._abort_inflight()
        assert self._ring is not None
        # Unregister, then unmap our own mappings from a worker thread while the reads
        # are still armed: munmap of a range the kernel still counts as registered
        # (EVENT_UNMAP) waits until an UNMAP event is read, and only this loop reads.
        owned = [r for r in self._regions if self._release_region(r)]
        if owned:
            await asyncio.to_thread(lambda: [self._unmap(r) for r in owned])
        for ctx in self._contexts:
            self._stop_reading(ctx)
        # faults read while the regions went away (their handlers were started in the
        # meantime): the same treatment, still on an open uffd
        await self._abort_inflight(grace=0.0)
        for ctx in self._contexts:
            ctx.uffd.close()
            if ctx.bufring is not None:
                self._ring.free_buffers(ctx.bufring.group)  # the ring may outlive us
                ctx.bufring = None
        if self._given_ring is None:
            self._ring.close()
        self._closed.set()
        self._log.info("uffd_aio.pager_closed", faults=self._counters.faults,
                       errors=self._counters.errors)

    async def _wait_idle(self) -> None:
        """Until no handler runs and none waits in the backlog."""
        while self._running or self._backlog:
            assert self._loop is not None
            if self._idle_waiter is None or self._idle_waiter.done():
                self._idle_waiter = self._loop.create_future()
            await self._idle_waiter

    async def _abort_inflight(self, grace: float = 1.0) -> None:
        """Closing: cancel the running handlers and apply the error policy to every
        fault still in flight, synchronously, while the uffds are still open.

        The cancelled handlers get ``grace`` seconds to finish (their done-callbacks
        apply the policy); faults still in flight after that (a handler that ignores
        the cancellation, a resolution being retried on EAGAIN) get the policy
        directly and are finished, so a late result is dropped.  Repeated a few
        times: finishing a fault can start a deferred one.
        """
        for _ in range(4):
            infs = [inf for ctx in self._contexts for inf in ctx.inflight.values()]
            if not infs and not self._backlog:
                return
            while self._backlog:
                inf = self._backlog.popleft()
                if inf.ctx.inflight.get(inf.page) is inf:
                    self._fail(inf, PagerClosed("pager closed before the handler ran"))
            tasks = [inf.task for inf in infs if inf.task is not None and not inf.task.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                # a task's done-callback (_task_done: policy) runs before wait() returns
                _, stuck = await asyncio.wait(tasks, timeout=grace) if grace > 0 else (
                    None, tasks)
                if stuck:
                    await asyncio.sleep(0)  # let the cancellations be delivered
            self._flush_pending()
            for ctx in self._contexts:
                for inf in list(ctx.inflight.values()):
                    self._fail(inf, PagerClosed("pager closed while the fault was in flight"))
            self._flush_pending()

    # ---- regions -----------------------------------------------------------

    def _check_open(self) -> _Context:
        if self._main is None:
            raise RuntimeError("pager not started: use 'async with Pager() as pager'")
        if self._closing:
            raise PagerClosed("pager is closing")
        return self._main

    def map(self, length: int, *, mode: Mode | int = Mode.MISSING, shared: bool = False,
            page_size: int | None = None, name: str | None = None) -> Region:
        """mmap ``length`` bytes (anonymous private, or shmem with ``shared``) and register it.

        MINOR mode needs shared memory: the region then has ``memfd`` and an
        unregistered ``alias`` mapping through which the page cache is filled.
        ``page_size``: a huge page size (``2 << 20``) maps hugetlbfs memory
        (``MAP_HUGETLB``; shared: a ``MFD_HUGETLB`` memfd) from the reserved pool
        (``/proc/sys/vm/nr_hugepages``; :class:`~uffd_aio.hugepages.HugePagesUnavailable`
        when it is short); every fault is then resolved in whole huge pages.
        """
        ctx = self._check_open()
        mode = Mode(mode)
        ps = page_size or PAGE_SIZE
        hugepages.check_size(ps)
        length = _round_up(length, ps)
        if mode & Mode.MINOR:
            shared = True
        memfd = alias = None
        try:
            if shared:
                memfd = os.memfd_create(f"uffd_aio:{name or 'region'}",
                                        os.MFD_CLOEXEC | hugepages.memfd_flags(ps))
                os.ftruncate(memfd, length)
                addr = ll.mmap(length, flags=ll.MAP_SHARED, fd=memfd)
                if mode & Mode.MINOR:
                    alias = ll.mmap(length, flags=ll.MAP_SHARED, fd=memfd)
            elif ps != PAGE_SIZE:  # reserved up front (no MAP_NORESERVE): ENOMEM now, not
                addr = ll.mmap(length, flags=ll.MAP_PRIVATE | ll.MAP_ANONYMOUS  # SIGBUS later
                               | hugepages.map_flags(ps))
            else:
                addr = ll.mmap(length)
        except OSError as exc:
            if memfd is not None:
                os.close(memfd)
            if ps != PAGE_SIZE:
                raise hugepages.unavailable(ps, length, exc) from exc
            raise
        region = Region(self, addr, length, mode, ps,
                        name or f"region{len(self._regions)}", owned=True, memfd=memfd,
                        alias=alias)
        try:
            ctx.uffd.register(addr, length, mode)
        except BaseException:
            self._unmap(region)
            raise
        self._add_region(ctx, region)
        return region

    def register(self, address: int, length: int, *, mode: Mode | int = Mode.MISSING,
                 page_size: int | None = None, name: str | None = None) -> Region:
        """Register memory the caller mapped (it stays the caller's to unmap).

        ``page_size`` (default: what the kernel uses there, from
        ``/proc/self/smaps``) must be the memory's real page size: hugetlbfs
        memory (``MAP_HUGETLB``, a hugetlbfs memfd) has 2 MiB (or 1 GiB) pages,
        and a mismatch raises :class:`~uffd_aio.hugepages.PageSizeMismatch`.
        """
        ctx = self._check_open()
        if page_size is not None:
            hugepages.check_size(page_size)
        real = hugepages.check_range(address, length, page_size or 0, what="register")
        ps = page_size or real or PAGE_SIZE
        if address % ps or length % ps or length <= 0:
            raise ValueError(f"address {address:#x} and length {length:#x} must be multiples "
                             f"of the page size {ps:#x}")
        ctx.uffd.register(address, length, Mode(mode))
        region = Region(self, address, length, Mode(mode), ps,
                        name or f"region{len(self._regions)}")
        self._add_region(ctx, region)
        return region

    def adopt(self, address: int, length: int, *, store_offset: int = 0,
              page_size: int | None = None, mode: Mode | int = Mode.MISSING,
              name: str | None = None) -> Region:
        """Describe a range that the uffd's owner (another process) already registered."""
        ctx = self._check_open()
        ps = page_size or PAGE_SIZE
        if address % ps or length % ps or length <= 0:
            raise ValueError(f"region {address:#x}+{length:#x} is not aligned to {ps:#x}")
        region = Region(self, address, length, Mode(mode), ps,
                        name or f"region{len(self._regions)}", store_offset=store_offset,
                        remote=True)
        self._add_region(ctx, region)
        return region

    def _add_region(self, ctx: _Context, region: Region) -> None:
        for x in ctx.extents:
            if x.start < region.end and region.address < x.end:
                raise ValueError(f"{region!r} overlaps {x.region!r}")
        ctx.add_extent(region.address, region.end, region, 0)
        self._regions.append(region)
        self._log.debug("uffd_aio.region_added", region=region.name,
                        address=hex(region.address), length=region.length,
                        mode=str(region.mode))

    def uffd_for(self, region: Region) -> Userfaultfd:
        """The uffd that serves ``region`` (for its write-protect and prefetch ioctls)."""
        return self.uffd

    @property
    def closing(self) -> bool:
        """True once :meth:`aclose` has started (faults then get the policy, not handlers)."""
        return self._closing

    async def unregister(self, region: Region) -> None:
        """Stop serving ``region`` (waits for its running handlers)."""
        # rare and short: polling beats keeping an Event per region on the fault path
        while any(inf.region is region for c in self._contexts  # noqa: ASYNC110
                  for inf in c.inflight.values()):
            await asyncio.sleep(0.001)
        owned = self._release_region(region)
        self._regions.remove(region)
        if owned:  # off the loop thread: see aclose
            await asyncio.to_thread(self._unmap, region)

    def _release_region(self, region: Region) -> bool:
        """Unregister; True if the mapping is ours to unmap (off the loop thread)."""
        if region.closed:
            return False
        region.closed = True
        self._native_drop(region)
        for ctx in self._contexts:
            ctx.remove_range(region.address, region.end)
        if not region.remote and self._main is not None and not self._main.uffd.closed:
            try:
                self._main.uffd.unregister(region.address, region.length)
            except OSError as exc:
                self._log.debug("uffd_aio.unregister_failed", region=region.name, error=str(exc))
        return region.owned

    @staticmethod
    def _unmap(region: Region) -> None:
        for addr in (region.address, region.alias):
            if addr is not None:
                try:
                    ll.munmap(addr, region.length)
                except OSError:
                    pass
        if region.memfd is not None:
            os.close(region.memfd)
            region.memfd = None

    def fault_in_flight(self, address: int) -> bool:
        """A fault on the page at ``address`` is being handled (read, not yet finished).

        The dirty tracker's evictor leaves such pages alone (handlers/dirty.py)."""
        return any(address in ctx.inflight for ctx in self._contexts)

    def on_event(self, fn: EventHandler) -> EventHandler:
        """Add a handler for Fork/Remap/Remove/Unmap events of any region (decorator)."""
        self._event_handlers.append(fn)
        return fn

    # ---- reading -----------------------------------------------------------

    def _add_context(self, uffd: Userfaultfd, label: str) -> _Context:
        ctx = _Context(self, uffd, label)
        uffd.page_size_of = functools.partial(_page_size_at, ctx)  # hugetlbfs EEXIST skips
        self._contexts.append(ctx)
        ring = self.ring
        choice = self._read_mode_choice
        if choice == "auto":
            # one read per batch.  Multishot (6.7+) saves the re-arm and its submit, but
            # its completion work moves into the resolving ioctl: measured a wash on
            # 6.18 (T=1 p50 -1 us, T=4 +5 us; benchmarks/README.md)
            choice = "read"
        if choice == "multishot":
            if not ring.supports(ll.OP_READ_MULTISHOT):
                raise UffdError("this kernel's io_uring has no READ_MULTISHOT (6.7+)")
            # a group id of its own: pagers (one per handed-over uffd) may share a ring
            ctx.bufring = ring.provide_buffers(None, 64, ev_mod.MSG_SIZE * _READ_BATCH)
        ctx.read_mode = choice
        ctx.reading = True
        self._arm(ctx)
        return ctx

    def _arm(self, ctx: _Context) -> None:
        if not ctx.reading or ctx.uffd.closed:
            return
        ring = self.ring
        mode = ctx.read_mode
        cb = ctx.read_cb
        if cb is None:
            cb = ctx.read_cb = lambda res, flags, ctx=ctx: self._on_read(ctx, res, flags)
        if mode == "read":
            ctx.read_ud = ring.submit_rw(ll.OP_READ, ctx.uffd.fd, ctx.buf_addr, len(ctx.buf),
                                         -1, cb)
        elif mode == "multishot":
            assert ctx.bufring is not None
            ctx.read_ud = ring.submit_read_multishot(ctx.uffd.fd, ctx.bufring.group, cb)
        else:
            ctx.read_ud = ring.submit_poll(ctx.uffd.fd, 1, cb)  # POLLIN

    def stop_reading(self) -> None:
        """Take no new faults (running handlers still finish and resolve); used before
        ``aclose`` when the uffd goes on to another server (``serve --takeover``), so
        that closing waits only for the handlers already running."""
        for ctx in self._contexts:
            self._stop_reading(ctx)

    def _stop_reading(self, ctx: _Context) -> None:
        ctx.reading = False
        self._native_close(ctx)
        if ctx.read_ud is not None and self._ring is not None and not self._ring.closed:
            self._ring.cancel(ctx.read_ud)
            self._ring.flush()
        ctx.read_ud = None

    def _on_read(self, ctx: _Context, res: int, flags: int) -> None:
        more = bool(flags & ll.CQE_F_MORE)
        if res < 0:
            if not more:
                ctx.read_ud = None
            if not ctx.reading:
                return
            err = -res
            if err in (E.EAGAIN, E.EINTR, E.ENOBUFS, E.ECANCELED):
                ctx.errors_in_row += 1
                if ctx.errors_in_row > 100 and ctx.read_mode != "poll":
                    self._log.warning("uffd_aio.read_fallback", uffd=ctx.uffd.fd,
                                      from_mode=ctx.read_mode, error=os.strerror(err))
                    ctx.read_mode = "poll"
                if not more:
                    self._arm(ctx)
                return
            if err in (E.EINVAL, E.EOPNOTSUPP) and ctx.read_mode != "poll":
                self._log.warning("uffd_aio.read_fallback", uffd=ctx.uffd.fd,
                                  from_mode=ctx.read_mode, error=os.strerror(err))
                ctx.read_mode = "poll"
                self._arm(ctx)
                return
            self._log.error("uffd_aio.read_failed", uffd=ctx.uffd.fd, error=os.strerror(err))
            ctx.reading = False
            return
        ctx.errors_in_row = 0
        self._counters.reads += 1
        if ctx.read_mode == "read":
            if ctx.engine is not None:
                res = self._native_pass(ctx, res)
            msgs = ev_mod.decode(ctx.buf, res)
            ctx.read_ud = None
            try:
                if msgs:
                    self._dispatch(ctx, msgs)
                    self._read_on(ctx)
            finally:
                self._arm(ctx)
            return
        elif ctx.read_mode == "multishot":
            assert ctx.bufring is not None
            bid = flags >> ll.CQE_BUFFER_SHIFT
            data = ctx.bufring.view(bid, res) if res else b""
            msgs = ev_mod.decode(self._native_filter(ctx, data) if ctx.engine else data)
            ctx.bufring.recycle(bid)
            if not more:
                ctx.read_ud = None
                self._arm(ctx)
        else:
            msgs = self._read_now(ctx)
            self._arm(ctx)
        if msgs:
            self._dispatch(ctx, msgs)

    def _read_on(self, ctx: _Context) -> None:
        """After resolving a batch, read the uffd directly while it has messages (at
        most _READ_ON batches), then let the caller re-arm the io_uring read.

        The resolutions just made woke the faulting threads; when they run on this
        CPU they have faulted again before the ioctl returned, so the next batch is
        usually waiting: one read(2) gets it, where re-arming the io_uring read
        costs a prep, an io_uring_enter and a reap (benchmarks/README.md).  No
        io_uring read is armed meanwhile (the caller arms after), so nothing else
        consumes messages; each batch is dispatched before the next read.
        """
        fd = ctx.uffd.fd
        bufs = [ctx.buf]
        for _ in range(_READ_ON):
            if not ctx.reading or ctx.uffd.closed:
                return
            try:
                n = os.readv(fd, bufs)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._log.debug("uffd_aio.read_on_failed", uffd=fd, error=str(exc))
                return
            if n <= 0:
                return
            self._counters.reads += 1
            if ctx.engine is not None:
                n = self._native_pass(ctx, n)
                if not n:
                    continue
            self._dispatch(ctx, ev_mod.decode(ctx.buf, n))

    def _read_now(self, ctx: _Context) -> list[ev_mod.Msg]:
        out: list[ev_mod.Msg] = []
        while True:
            try:
                data = os.read(ctx.uffd.fd, len(ctx.buf))
            except BlockingIOError:
                return out
            except OSError as exc:
                self._log.error("uffd_aio.read_failed", uffd=ctx.uffd.fd, error=str(exc))
                return out
            out.extend(ev_mod.decode(self._native_filter(ctx, data) if ctx.engine else data))
            if len(data) < len(ctx.buf):
                return out

    # ---- native engine (issue 12: region.serve_from) -----------------------------
    # The hot path of native sources is C (uffd_aio/ring/csrc/engine.c); these hooks
    # pass each read buffer through the context's engine and drop/close it with the
    # regions.  Everything the engine passes up is dispatched as before.

    def _serve_from(self, region: Region, source: Any, *, offset: int,
                    readahead: Any) -> None:
        from uffd_aio import native

        ctx = self._check_open()
        if region.pager is not self or region.closed:
            raise ValueError(f"{region!r} is not an open region of pager {self.name!r}")
        if not region.mode & Mode.MISSING or region.mode & Mode.MINOR:
            raise ValueError(f"{region!r}: a native source serves MISSING faults; the region "
                             f"is registered {region.mode!s}")
        src = native.make_source(region, source, offset=offset, readahead=readahead)
        self._native_drop(region)  # serving a new source replaces the old one
        if ctx.engine is None:
            ctx.engine = self._native_engine(ctx)
        try:
            rid = ctx.engine.add(region.address, region.length, region.page_size, src.kind,
                                 src.src, src.src_len, *src.ra)
            if src.fd is not None:
                ctx.engine.set_file(rid, src.fd, src.file_offset)
        except BaseException:
            src.close()
            raise
        self._native[region] = (ctx, rid, src)
        region.fault_handler = src.fallback
        region.eager = None
        self._log.debug("uffd_aio.native_region", region=region.name, source=src.description,
                        readahead=src.ra)

    def _native_engine(self, ctx: _Context) -> Engine:
        """A context's engine, on the pager's ring: READs of page-cache misses, and
        io_uring WRITEs on the uffd when the backend is the ring-write one."""
        engine = Engine(ctx.uffd.fd)
        try:
            wfd = -1
            if self._backend.name == "ring":
                from uffd_aio import resolve_ring

                wfd = resolve_ring.writer_fd(ctx.uffd)
            engine.attach(self.ring.native_handle, wfd, self._native_read_slots,
                          _NATIVE_SLOT_BYTES if self._native_read_slots else 0)
        except BaseException:
            engine.close()
            raise
        ctx.engine_up = bytearray(ev_mod.MSG_SIZE * _READ_BATCH)
        if not self._native_hooked:
            self.ring.add_engine_hook(self._native_completions)
            self._native_hooked = True
        return engine

    def _native_completions(self) -> None:
        """Ring hook: faults the engines' READs/WRITEs could not serve, to Python."""
        for ctx in self._contexts:
            engine, buf = ctx.engine, ctx.engine_up
            if engine is None or buf is None:
                continue
            addr, keep = ll.buffer_address(buf, writable=True)
            while n := engine.take(addr, len(buf)):
                self._dispatch(ctx, ev_mod.decode(buf, n * ev_mod.MSG_SIZE))
            del keep

    def _native_drop(self, region: Region) -> None:
        entry = self._native.pop(region, None)
        if entry is None:
            return
        ctx, rid, src = entry
        if ctx.engine is not None:
            waited = ctx.engine.inflight()
            ctx.engine.drop(rid)  # waits for the region's WRITEs (they read src)
            if waited and self._ring is not None:
                self._ring.schedule_drain()  # what that wait reaped, to its owners
        src.close()

    def _native_close(self, ctx: _Context) -> None:
        if ctx.engine is None:
            return
        for region in [r for r, (c, _, _) in self._native.items() if c is ctx]:
            self._native_drop(region)
        self._native_retired += ctx.engine.stats()
        ctx.engine.close()  # READs in flight: C frees their buffers when they complete
        ctx.engine = None
        ctx.engine_up = None
        if self._native_hooked and not any(c.engine for c in self._contexts) \
                and self._ring is not None:
            self._ring.remove_engine_hook(self._native_completions)
            self._native_hooked = False

    def _native_pass(self, ctx: _Context, nbytes: int) -> int:
        """Run the engine on the nbytes read into ctx.buf; the bytes left for Python."""
        assert ctx.engine is not None
        left = ctx.engine.run(ctx.buf_addr, nbytes, len(ctx.buf), self._native_reads,
                              self._native_budget_ns)
        return left * ev_mod.MSG_SIZE

    def _native_filter(self, ctx: _Context, data: bytes) -> bytes:
        """Multishot/poll reads: the engine on a copy in ctx.buf (unused in those modes)."""
        n = len(data)
        ctx.buf[:n] = data
        assert ctx.engine is not None
        left = ctx.engine.run(ctx.buf_addr, n, len(ctx.buf)) * ev_mod.MSG_SIZE
        return bytes(ctx.buf[:left])

    def _native_stats(self, snap: PagerStats) -> PagerStats:
        es = self._native_retired
        for ctx in self._contexts:
            if ctx.engine is not None:
                es += ctx.engine.stats()
        if not es.native_faults and not es.passed_up:
            return attrs.evolve(snap, python_faults=snap.faults)
        return attrs.evolve(
            snap, faults=snap.faults + es.native_faults, python_faults=snap.faults,
            native_faults=es.native_faults, native_pages=es.pages_copied + es.zero_pages,
            native_readahead_pages=es.readahead_pages, native_wakes=es.wakes,
            native_cache_misses=es.cache_misses, native_passed_up=es.passed_up,
            native_reads=es.reads, native_ioctls=es.ioctls,
            native_cache_reads=es.cache_reads, native_cache_read_pages=es.cache_read_pages,
            native_read_waits=es.read_waits, native_read_passed_up=es.read_passed_up,
            native_ring_writes=es.ring_writes, native_pwrites=es.pwrites)

    # ---- dispatch ---------------------------------------------------------

    def _dispatch(self, ctx: _Context, msgs: list[ev_mod.Msg]) -> None:
        self._in_batch = True
        self._solo = len(msgs) == 1 and not self._ring_backend
        try:
            for m in msgs:
                if type(m) is PageFaultMsg:
                    self._on_fault(ctx, m)
                else:
                    self._on_event(ctx, m)
        finally:
            self._in_batch = self._solo = False
        if self._pending:
            self._flush_pending()

    def _on_fault(self, ctx: _Context, msg: PageFaultMsg) -> None:
        c = self._counters
        c.faults += 1
        x = ctx.lookup(msg.address)
        if x is None:
            self._stray_fault(ctx, msg)
            return
        region = x.region
        page = msg.address & ~(region.page_size - 1)
        inf = ctx.inflight.get(page)
        if inf is not None:
            if inf.resolved or inf.resolving:
                # Resolved explicitly (ev.copy...), its handler not finished yet: the
                # faulting thread was already woken, so this is a NEW fault on the page
                # (say a write after a read resolved write-protected), not a duplicate.
                # Dropping it would leave the thread asleep: run it after this one.
                self._deferred.setdefault(inf, []).append(msg)
                return
            inf.dups += 1
            c.duplicate_faults += 1
            return
        inf = _Inflight(self, ctx, msg, region, page)
        ctx.inflight[page] = inf
        if self._running >= self._max_inflight:
            self._backlog.append(inf)
            return
        self._start(inf, x)

    def _stray_fault(self, ctx: _Context, msg: PageFaultMsg) -> None:
        self._log.error("uffd_aio.stray_fault", uffd=ctx.uffd.fd, address=hex(msg.address))
        self._counters.errors += 1
        page = msg.address & ~(PAGE_SIZE - 1)
        self._apply_policy(ctx, msg, page, PAGE_SIZE)

    def _start(self, inf: _Inflight, x: _Extent | None = None) -> None:
        if x is None:
            x = inf.ctx.lookup(inf.page)
            if x is None:  # unmapped while it waited
                self._finish(inf)
                return
        self._running += 1
        region = inf.region
        msg = inf.msg
        f = msg.flags
        inf.end = x.end
        fault = _new_fault(msg.address, inf.page, x.offset + (inf.page - x.start),
                           region.page_size, region, f & _WRITE != 0, f & _WP != 0,
                           f & _MINOR != 0, msg.thread_id if inf.ctx.thread_ids else None, inf)
        inf.fault = fault
        handler = region.fault_handler
        if handler is None:
            if not self._warned_default:
                self._warned_default = True
                self._log.warning("uffd_aio.no_handler", region=region.name,
                                  hint="faults get zero pages; set @region.on_fault")
            self._complete(inf, None)
            return
        self._counters.handler_calls += 1
        try:
            res = handler(fault)
        except Exception as exc:
            self._fail(inf, exc)
            return
        if type(res) is _CoroType or inspect.isawaitable(res):
            eager = self._eager if region.eager is None else region.eager
            loop = self._loop
            assert loop is not None
            if eager and type(res) is _CoroType:
                try:
                    first = res.send(None)
                except StopIteration as stop:
                    self._complete(inf, stop.value)
                    return
                except Exception as exc:
                    self._fail(inf, exc)
                    return
                task = loop.create_task(_resume(res, first))
            else:
                task = loop.create_task(_as_coro(res))
            inf.task = task
            task.add_done_callback(functools.partial(self._task_done, inf))
            if self._handler_timeout is not None:
                inf.timer = loop.call_later(self._handler_timeout, self._timeout, inf)
            return
        self._complete(inf, res)

    def _timeout(self, inf: _Inflight) -> None:
        inf.timer = None
        if inf.task is not None and not inf.task.done():
            inf.timed_out = True
            inf.task.cancel()

    def _task_done(self, inf: _Inflight, task: asyncio.Task[Any]) -> None:
        if inf.timer is not None:
            inf.timer.cancel()
            inf.timer = None
        if inf.ctx.inflight.get(inf.page) is not inf:
            # already finished: closing applied the policy to it (_abort_inflight)
            if not task.cancelled() and task.exception() is not None:
                self._log.debug("uffd_aio.late_handler_error", page=hex(inf.page),
                                error=repr(task.exception()))
            return
        if task.cancelled():
            if inf.timed_out:
                self._counters.timeouts += 1
                exc: BaseException = HandlerTimeout(
                    f"handler for {inf.fault!r} exceeded {self._handler_timeout} s")
            elif self._closing:
                exc = PagerClosed("pager closed while the handler ran")
            else:
                exc = asyncio.CancelledError("handler task was cancelled")
            self._fail(inf, exc)
            return
        err = task.exception()
        if err is not None:
            self._fail(inf, err)
        else:
            self._complete(inf, task.result())

    def _complete(self, inf: _Inflight, result: Any) -> None:
        """The handler returned ``result``: queue its resolution."""
        if inf.resolved:
            if result is not None:
                self._log.warning("uffd_aio.result_ignored", fault=repr(inf.fault),
                                  reason="the handler already resolved the fault explicitly")
            self._finish(inf)
            return
        if result is None:
            op = _default_op(inf)
        else:
            try:
                if type(result) is Moved:
                    n = inf.page_size if result.length is None else result.length
                    self._check_move(inf, inf.page, n, result)
                    op = Op(Kind.MOVE, inf.page, n, result)
                else:
                    op = self._copy_op(inf, result)
                    b = self._ioctl_backend
                    if self._solo and b is self._backend and not self._pending:
                        # the common case (a lone fault, its handler returned the page):
                        # one native UFFDIO_COPY that wakes, then _resolved's bookkeeping
                        # without _execute; anything but full success (EEXIST,
                        # EAGAIN, a closed uffd: fd -1) goes through _execute, which
                        # handles it (and issues the COPY again: rare)
                        assert b is not None
                        b.ioctls += 1
                        if _copy_buf(inf.ctx.uffd.fd, op.address, _from_buffer(op.data),
                                     op.length, 0) == 0:
                            self._resolved(op, (inf,))
                            return
            except (BadHandlerResult, FeatureUnavailable) as exc:
                self._fail(inf, exc)
                return
        if self._solo and not self._pending:
            # the batch's only message: the flush after it would run this op alone
            self._execute(inf.ctx, op, [inf])
            return
        self._queue(inf, op)

    def _copy_op(self, inf: _Inflight, result: Any) -> Op:
        if inf.msg.flags & (_WP | _MINOR):
            kind = "write-protect" if inf.msg.is_wp else "minor"
            raise BadHandlerResult(
                f"handler for a {kind} fault at {inf.page:#x} returned data; the page is "
                f"already present: return None (or await ev.unprotect()/ev.continue_())")
        try:
            view = memoryview(result).cast("B")
        except TypeError:
            raise BadHandlerResult(
                f"handler for {inf.fault!r} returned {type(result).__name__}; expected a "
                f"bytes-like object or None") from None
        n = view.nbytes
        ps = inf.page_size
        if n == 0 or n % ps:
            raise BadHandlerResult(
                f"handler for {inf.fault!r} returned {n} bytes; expected a non-zero multiple "
                f"of the page size ({ps})")
        if inf.task is None:  # ran eagerly to the end: the extent seen in _start still holds
            end: int | None = inf.end
        else:
            x = inf.ctx.lookup(inf.page)
            end = None if x is None else x.end
        if end is not None and inf.page + n > end:
            raise BadHandlerResult(
                f"handler for {inf.fault!r} returned {n} bytes, which run "
                f"{inf.page + n - end} bytes past the end of {inf.region!r}")
        return _new_op(Kind.COPY, inf.page, n, view, False)

    def _check_range(self, inf: _Inflight, start: int, length: int, *, what: str) -> None:
        ps = inf.page_size
        x = inf.ctx.lookup(start)
        if length <= 0 or length % ps or start % ps:
            raise BadHandlerResult(f"{what} of {length} bytes at {start:#x}: address and "
                                   f"length must be non-zero multiples of the page size {ps}")
        if x is None or start + length > x.end:
            raise BadHandlerResult(f"{what} {start:#x}+{length:#x} is outside "
                                   f"{inf.region!r}")

    def _check_move(self, inf: _Inflight, dst: int, length: int, moved: Moved) -> None:
        """What UFFDIO_MOVE needs that we can tell before asking the kernel."""
        region = inf.region
        if inf.msg.flags & (_WP | _MINOR):
            raise BadHandlerResult(f"move for {inf.fault!r}: MOVE fills missing pages; this "
                                   f"page is present (return None, or unprotect/continue)")
        if region.remote or inf.ctx is not self._main:
            raise BadHandlerResult(
                f"move for {inf.fault!r}: UFFDIO_MOVE moves pages inside the address space "
                f"that owns the uffd, and {region!r} is another process's memory (a handed-"
                f"over uffd or a fork child): copy the data instead")
        if not inf.ctx.uffd.has(Feature.MOVE):
            raise FeatureUnavailable(["MOVE"], available=feature_names(inf.ctx.uffd.features),
                                     what="ev.move / uffd_aio.Moved (Linux 6.8+)")
        if region.memfd is not None or region.page_size != PAGE_SIZE:
            raise BadHandlerResult(
                f"move into {region!r}: UFFDIO_MOVE works only on private anonymous memory "
                f"with base pages (not shmem or hugetlbfs): copy instead")
        src = moved.src
        if not isinstance(src, int) or src <= 0 or src % PAGE_SIZE:
            raise BadHandlerResult(f"move source {src!r} must be a page-aligned address")
        self._check_range(inf, dst, length, what="move")
        if src < dst + length and dst < src + length:
            raise BadHandlerResult(f"move source {src:#x}+{length:#x} overlaps the "
                                   f"destination {dst:#x}")

    # ---- resolution -----------------------------------------------------------

    def _queue(self, inf: _Inflight | None, op: Op, ctx: _Context | None = None) -> None:
        self._pending.append((inf, op, ctx if ctx is not None else inf.ctx))  # type: ignore[union-attr]
        if not self._in_batch and not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush_pending)

    def _flush_pending(self) -> None:
        if not self._ring_backend:
            self._flush_pending_now()
            return
        backend: Any = self._backend
        # ring writes: one io_uring_enter for the whole batch (with the re-armed read),
        # still before any other code runs, so they keep their order with ioctls
        backend.hold = True
        try:
            self._flush_pending_now()
        finally:
            backend.hold = False
            self.ring.flush()

    def _flush_pending_now(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if not pending:
            return
        if len(pending) == 1:
            inf, op, ctx = pending[0]
            self._execute(ctx, op, [inf] if inf is not None else [])
            return
        # common with several faulting threads: one uffd, ranges that neither overlap
        # nor touch: merging would return them unchanged, so run them in address order
        ctx0 = pending[0][2]
        pending.sort(key=_op_address)
        end = -1
        for _, op, ctx in pending:
            if ctx is not ctx0 or op.address <= end:
                break
            end = op.address + op.length
        else:
            b = self._ioctl_backend
            if b is not self._backend:
                b = None
            c = self._counters
            for inf, op, ctx in pending:
                if b is not None and inf is not None and op.kind is Kind.COPY and not op.wp:
                    # a handler's page(s), as in _complete: one native call when it works
                    b.ioctls += 1
                    if _copy_buf(ctx.uffd.fd, op.address, _from_buffer(op.data), op.length,
                                 0) == 0:
                        c.resolved_bytes += op.length
                        c.copies += 1
                        c.resolved_pages += 1
                        self._finish(inf)
                        continue
                self._execute(ctx, op, [inf] if inf is not None else [])
            return
        by_ctx: dict[int, tuple[_Context, list[tuple[_Inflight | None, Op]]]] = {}
        for inf, op, ctx in pending:
            by_ctx.setdefault(id(ctx), (ctx, []))[1].append((inf, op))
        for ctx, items in by_ctx.values():
            merged = merge(op for _, op in items)
            owners: dict[int, list[_Inflight]] = {id(m): [] for m in merged}
            for inf, op in items:
                m = covering(merged, op.address)
                if m is not None and inf is not None:
                    owners[id(m)].append(inf)
            for m in merged:
                self._execute(ctx, m, owners[id(m)])

    def _execute(self, ctx: _Context, op: Op, infs: list[_Inflight]) -> None:
        if ctx.uffd.closed:  # a retry timer that outlived aclose(): nothing left to do
            for inf in infs:
                self._finish(inf)
            return
        try:
            res = self._backend.execute(ctx.uffd, op)
        except MmChanging:
            self._retry_later(ctx, op, infs)
            return
        except RangeGone:
            for inf in infs:
                self._finish(inf)
            return
        except ResolveError as exc:
            self._resolve_failed(ctx, op, infs, exc)
            return
        if isinstance(res, int):
            self._resolved(op, infs)
        else:
            for inf in infs:
                inf.resolving = True
            res.add_done_callback(lambda f: self._execute_done(ctx, op, infs, f))

    def _execute_done(self, ctx: _Context, op: Op, infs: list[_Inflight],
                      fut: asyncio.Future[int]) -> None:
        exc = fut.exception()
        if exc is None:
            self._resolved(op, infs)
        elif isinstance(exc, MmChanging):
            self._retry_later(ctx, op, infs)
        elif isinstance(exc, RangeGone):
            for inf in infs:
                self._finish(inf)
        elif isinstance(exc, ResolveError):
            self._resolve_failed(ctx, op, infs, exc)
        else:
            self._resolve_failed(ctx, op, infs, ResolveError(
                E.EIO, str(exc), op=op.kind.value, address=op.address, length=op.length))

    def _resolved(self, op: Op, infs: Sequence[_Inflight]) -> None:
        c = self._counters
        c.resolved_bytes += op.length
        _count_op(c, op.kind)
        for inf in infs:
            c.resolved_pages += 1
            self._finish(inf)

    def _retry_later(self, ctx: _Context, op: Op, infs: list[_Inflight]) -> None:
        attempts = max((inf.attempts for inf in infs), default=0) + 1
        for inf in infs:
            inf.attempts = attempts
        self._counters.eagain_retries += 1
        if attempts > EAGAIN_MAX_RETRIES:
            self._resolve_failed(ctx, op, infs, ResolveError(
                E.EAGAIN, "address space kept changing", op=op.kind.value, address=op.address,
                length=op.length))
            return
        assert self._loop is not None
        self._loop.call_later(EAGAIN_RETRY_INTERVAL, self._execute, ctx, op, infs)

    def _resolve_failed(self, ctx: _Context, op: Op, infs: list[_Inflight],
                        exc: ResolveError) -> None:
        if op.kind is Kind.MOVE and isinstance(exc, MoveError) and (
                exc.done or exc.errno == E.EEXIST):
            # a handler's Moved: the faulting page (op.address) was moved, or is there
            # already; what was not moved stays at the source
            self._log.warning("uffd_aio.move_incomplete", address=hex(op.address),
                              moved=exc.done, length=op.length, error=str(exc))
            if not exc.done:  # EEXIST does not wake
                try:
                    ctx.uffd.wake(op.address, infs[0].page_size if infs else PAGE_SIZE)
                except OSError:
                    pass
            self._counters.moves += bool(exc.done)
            for inf in infs:
                self._counters.resolved_pages += 1
                self._finish(inf)
            return
        self._log.error("uffd_aio.resolve_failed", op=op.kind.value, address=hex(op.address),
                        length=op.length, error=str(exc))
        if op.kind is Kind.POISON or not infs:
            for inf in infs:
                self._finish(inf)
            if not infs:
                self._counters.errors += 1
            return
        for inf in infs:
            self._fail(inf, exc)

    def _resolve_explicit(self, inf: _Inflight, op: Op) -> int | asyncio.Future[int]:
        """ev.copy()/zero()/...: run now, outside batching; the fault counts as resolved."""
        ctx = inf.ctx
        try:
            # done when this returns (a handler may rely on it): ring writes -> pwrite
            res = self._sync_backend.execute(ctx.uffd, op)
        except MmChanging:
            assert self._loop is not None
            return asyncio.ensure_future(self._explicit_retry(inf, op), loop=self._loop)
        if isinstance(res, int):
            self._mark_explicit(inf, op, res)
            return res
        if op.address <= inf.page < op.end:
            inf.resolving = True
        # a ring write: EAGAIN arrives in the future; retried as with the ioctl backend
        return asyncio.ensure_future(self._explicit_await(inf, op, res), loop=self._loop)

    async def _explicit_await(self, inf: _Inflight, op: Op, fut: asyncio.Future[int]) -> int:
        try:
            n = await fut
        except MmChanging:
            return await self._explicit_retry(inf, op)
        self._mark_explicit(inf, op, n)
        return n

    async def _explicit_retry(self, inf: _Inflight, op: Op) -> int:
        async def attempt() -> int:
            res = self._sync_backend.execute(inf.ctx.uffd, op)
            return res if isinstance(res, int) else await res

        def count() -> None:
            self._counters.eagain_retries += 1

        n = await retry_while_mm_changing(attempt, op=op.kind.value, address=op.address,
                                          length=op.length, on_retry=count)
        self._mark_explicit(inf, op, n)
        return n

    def _mark_explicit(self, inf: _Inflight, op: Op, n: int) -> None:
        c = self._counters
        c.resolved_bytes += n
        _count_op(c, op.kind)
        if op.address <= inf.page < op.end and not inf.resolved:
            inf.resolved = True
            c.resolved_pages += 1

    # ---- errors ------------------------------------------------------------------

    def _fail(self, inf: _Inflight, exc: BaseException) -> None:
        """A handler failed: log, apply the error policy so no thread hangs."""
        if self._abandon:  # closing for a successor, which re-raises the fault (WAKE)
            self._log.debug("uffd_aio.fault_abandoned", page=hex(inf.page),
                            error=f"{type(exc).__name__}: {exc}")
            self._finish(inf)
            return
        if isinstance(exc, RangeGone):  # the process exited or dropped the range: no error
            self._log.info("uffd_aio.handler_range_gone", fault=repr(inf.fault) if inf.fault
                           else hex(inf.page), error=str(exc))
            if not inf.resolved:
                self._apply_policy(inf.ctx, inf.msg, inf.page, inf.page_size)
            self._finish(inf)
            return
        self._counters.errors += 1
        self._log.error("uffd_aio.handler_failed", fault=repr(inf.fault) if inf.fault else
                        hex(inf.page), policy=self._on_error,
                        error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        if self._on_error == "raise" and self._failure is None:
            self._failure = exc
        if not inf.resolved:
            self._apply_policy(inf.ctx, inf.msg, inf.page, inf.page_size)
        self._finish(inf)
        if self._on_error == "raise" and not self._closing:
            assert self._loop is not None
            self._loop.create_task(self.aclose())

    def _apply_policy(self, ctx: _Context, msg: PageFaultMsg, page: int, size: int) -> None:
        if self._abandon:
            return  # the successor's WAKE re-raises the fault
        if msg.is_wp:
            ops = [Op(Kind.UNPROTECT, page, size)]
        elif msg.is_minor:
            ops = [Op(Kind.POISON, page, size), Op(Kind.CONTINUE, page, size)]
        elif self._on_error == "zero":
            ops = [zero_op(page, size, size)]
        else:
            ops = [Op(Kind.POISON, page, size), zero_op(page, size, size)]
        if msg.is_wp and self._on_error != "zero":
            ops.insert(0, Op(Kind.POISON, page, size))
        backend = getattr(self._backend, "sync", self._backend)  # synchronous resolutions
        for op in ops:
            try:
                res = backend.execute(ctx.uffd, op)
                if not isinstance(res, int):
                    res.add_done_callback(lambda f: f.exception())
                _count_op(self._counters, op.kind)
                return
            except RangeGone:
                return
            except (ResolveError, OSError) as exc:
                self._log.warning("uffd_aio.policy_step_failed", op=op.kind.value,
                                  address=hex(page), error=str(exc))
        try:  # last resort: let the thread retry rather than hang
            ctx.uffd.wake(page, size)
        except OSError:
            pass

    def _finish(self, inf: _Inflight) -> None:
        ctx = inf.ctx
        if ctx.inflight.get(inf.page) is inf:
            del ctx.inflight[inf.page]
        else:
            return
        if inf.timer is not None:
            inf.timer.cancel()
            inf.timer = None
        if inf.fault is not None:
            self._running -= 1
            self._counters.latency.record(time.perf_counter_ns() - inf.t0)
            # PageFault._inf <-> _Inflight.fault is a cycle: break it so that both go by
            # refcount now, not by the cyclic GC (whose passes were ~5% of the fault path
            # and its millisecond pauses the latency tail)
            inf.fault = None
        while self._backlog and self._running < self._max_inflight:
            nxt = self._backlog.popleft()
            if nxt.ctx.inflight.get(nxt.page) is nxt:
                self._start(nxt)
        if self._deferred:
            later = self._deferred.pop(inf, None)
            for m in later or ():
                self._counters.faults -= 1  # counted when it arrived
                self._on_fault(ctx, m)
        if self._idle_waiter is not None and self._running == 0 and not self._backlog:
            w, self._idle_waiter = self._idle_waiter, None
            if not w.done():
                w.set_result(None)

    # ---- non-fault events -------------------------------------------------------

    def _on_event(self, ctx: _Context, msg: ev_mod.Msg) -> None:
        c = self._counters
        c.events += 1
        handlers = list(self._event_handlers)
        if isinstance(msg, Fork):
            c.forks += 1
            if self._follow_forks and not self._closing:
                child = Userfaultfd.from_fd(msg.ufd, ctx.uffd.features)
                cctx = self._add_context(child, f"{ctx.label}/fork{c.forks}")
                for x in ctx.extents:
                    cctx.add_extent(x.start, x.end, x.region, x.offset)
                if self._native:  # the child's pieces of native regions: an engine too
                    from uffd_aio import native
                    native.follow_fork(self, cctx)
                self._log.info("uffd_aio.fork_followed", parent_uffd=ctx.uffd.fd,
                               child_uffd=msg.ufd)
            else:
                os.close(msg.ufd)
        elif isinstance(msg, Remap):
            c.remaps += 1
            moved = ctx.remove_range(msg.old, msg.old + msg.length)
            for x in moved:
                delta = x.start - msg.old
                ctx.add_extent(msg.new + delta, msg.new + delta + (x.end - x.start), x.region,
                               x.offset)
            handlers += [h for x in moved for h in x.region.event_handlers]
        elif isinstance(msg, Remove):
            c.removes += 1
            handlers += self._region_handlers(ctx, msg.start, msg.end)
        elif isinstance(msg, Unmap):
            c.unmaps += 1
            handlers += self._region_handlers(ctx, msg.start, msg.end)
            ctx.remove_range(msg.start, msg.end)
        elif isinstance(msg, UnknownMsg):
            self._log.warning("uffd_aio.unknown_event", kind=msg.event)
            return
        self._log.debug("uffd_aio.event", uffd=ctx.uffd.fd, message=repr(msg))
        for h in dict.fromkeys(handlers):
            self._run_event_handler(h, msg)

    def _region_handlers(self, ctx: _Context, start: int, end: int) -> list[EventHandler]:
        return [h for x in ctx.extents if x.start < end and start < x.end
                for h in x.region.event_handlers]

    def _run_event_handler(self, handler: Callable[[Any], Any], msg: ev_mod.Msg) -> None:
        try:
            res = handler(msg)
        except Exception as exc:
            self._log.error("uffd_aio.event_handler_failed", message=repr(msg), exc_info=exc)
            return
        if inspect.isawaitable(res):
            assert self._loop is not None
            task = self._loop.create_task(_as_coro(res))
            task.add_done_callback(
                lambda t: t.cancelled() or t.exception() is None or self._log.error(
                    "uffd_aio.event_handler_failed", message=repr(msg), exc_info=t.exception()))


async def _as_coro(aw: Any) -> Any:
    return await aw


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to
