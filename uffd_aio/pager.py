"""Pager: serves the faults of one or more uffds on the running event loop.

Data flow of a fault: the outstanding io_uring read on the uffd completes ->
the ring reaps the CQE batch (one C call) -> :mod:`uffd_aio.events` decodes
it -> the sans-io core (:mod:`uffd_aio.dispatch`) maps the fault to its region,
deduplicates it per page and admits it (its :class:`~uffd_aio.PageFault` is the
one record of the fault) -> the pager runs the handler (eagerly: no Task unless
it really suspends) -> :mod:`uffd_aio.resolver` resolves what it returned (the
lone fault at once, a batch merged at its end) through the backend
(:mod:`uffd_aio.resolve`) -> the faulting thread resumes.

This module is the I/O and loop glue: the user-facing :class:`Pager` (lifecycle,
regions, stats), the uffd reads, the native engine's hooks, the handlers' Tasks
and timers, events' handlers.  Decisions are the core's.
"""

from __future__ import annotations

import asyncio
import errno as E
import functools
import inspect
import os
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Literal, TypeVar

import attrs

from uffd_aio import events as ev_mod
from uffd_aio import hugepages
from uffd_aio.binding import lowlevel as ll
from uffd_aio.binding.engine import Engine, EngineStats
from uffd_aio.dispatch import (
    Channel,
    Dispatcher,
    ErrorPolicy,
    Fault,
    Outcome,
    cancel_error,
    failure_outcome,
)
from uffd_aio.errors import (
    HandlerTimeout,
    PagerClosed,
    PagerFailed,
    UffdError,
)
from uffd_aio.events import (
    EventHandler,
    Fork,
    PageFaultMsg,
    Remap,
    Remove,
    UnknownMsg,
    Unmap,
)
from uffd_aio.log import get_logger
from uffd_aio.modes import DEFAULT_FEATURES, Feature, Mode
from uffd_aio.ops import FaultResult
from uffd_aio.region import PageFault, Region
from uffd_aio.resolve import (
    IoctlExecutor,
    Op,
    OpExecutor,
)
from uffd_aio.resolver import Resolver
from uffd_aio.ring import Ring
from uffd_aio.stats import Counters, PagerStats
from uffd_aio.uffd import (
    PAGE_SIZE,
    RangeGone,
    Userfaultfd,
)

if TYPE_CHECKING:
    from uffd_aio.native import NativeSource
    from uffd_aio.sources import NativeSourceArg, Readahead, TouchRecorder

__all__ = ["BackendName", "ErrorPolicy", "HandlerTimeout", "Pager", "PagerFailed", "ReadMode"]

BackendName = Literal["auto", "ioctl", "ring"]
ReadMode = Literal["auto", "multishot", "read", "poll"]

_READ_BATCH = 64  # uffd_msg per read
_READ_ON = 16  # direct reads after a dispatched batch before re-arming the ring read
_NATIVE_SLOT_BYTES = 256 * 1024  # native engine: one io_uring READ of page-cache misses
#: seconds between probes of fork children for exit (Pager._reap_forks)
FORK_REAP_INTERVAL = 5.0
_CoroType = types.CoroutineType
_T = TypeVar("_T")


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


class _Resume:
    """Continue a coroutine that was started eagerly, inside a real Task.

    The Task drives this generator; we forward sends and throws to the
    original coroutine, so its awaits (and cancellation) behave as if it had
    been a Task from the start.
    """

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[object, object, FaultResult], first: object) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[object, None, FaultResult]:
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
                    result: FaultResult = stop.value
                    return result
            else:
                try:
                    value = coro.send(None)
                except StopIteration as stop:
                    result = stop.value
                    return result


async def _resume(coro: Coroutine[object, object, FaultResult], first: object) -> FaultResult:
    return await _Resume(coro, first)


class _Context(Channel):
    """One uffd being served: the pager's own, a fork child's, or a handed-off one.
    The dispatch core's :class:`Channel` (extents, faults in flight) plus its reads."""

    uffd: Userfaultfd

    def __init__(self, pager: Pager, uffd: Userfaultfd, label: str, *, local: bool) -> None:
        super().__init__(uffd, features=uffd.features, local=local, resolver=pager._resolver)
        self.label = label
        self.read_ud: int | None = None
        self.read_cb: Callable[[int, int], None] | None = None  # made once, re-armed often
        self.read_mode: ReadMode = "read"
        self.buf = bytearray(ev_mod.MSG_SIZE * _READ_BATCH)
        self.buf_addr, self._buf_keep = ll.buffer_address(self.buf, writable=True)
        self.bufring: ll.BufRing | None = None
        self.reading = False
        self.errors_in_row = 0
        self.engine: Engine | None = None  # native fault engine (region.serve_from)
        self.engine_up: bytearray | None = None  # what its completions pass up (take)
        self.forked = False  # a fork child's: released once its address space is gone
        #: engine region id -> (source, page of the region at its page 0): the recording
        #: ones (serve_from(record=...)), whose first touches the engine logs
        self.native_rec: dict[int, tuple[NativeSource, int]] = {}


def _op_address(item: tuple[Fault | None, Op, _Context]) -> int:
    return item[1].address


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
        #: regions served by the native engine -> (context, engine region ids: one per
        #: piece of the region, source)
        self._native: dict[Region, tuple[_Context, list[int], NativeSource]] = {}
        self._native_retired = EngineStats()  # counters of engines already freed
        #: probing fork children for exit (the kernel sends no event): a timer while any
        self._fork_reaper: asyncio.TimerHandle | None = None
        self._log = get_logger(component="pager", pager=name)
        self._counters = Counters()
        self._contexts: list[_Context] = []
        self._main: _Context | None = None
        self._regions: list[Region] = []
        self._event_handlers: list[EventHandler] = []
        #: the sans-io core: admission, dedup, backlog, in-flight counts (uffd_aio.dispatch)
        self._core = Dispatcher(self._counters, max_inflight, PageFault)
        #: executes what the core decides: batches, the lone-fault fast path, retries,
        #: explicit ev.* calls, the error policy's ioctls (uffd_aio.resolver)
        self._resolver = Resolver(self._counters, on_error, finish=self._finish,
                                  fail=self._fail, name=name)
        self._started = False
        self._closing = False
        self._abandon = False  # aclose(abandon_inflight=True): a successor takes the uffd
        self._closed = asyncio.Event()
        # aclose waits for the core to be idle (no fault running, none backlogged): a
        # future made only then (an Event per fault cost more than the counts)
        self._idle_waiter: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ring: Ring | None = None
        self._warned_default = False

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
            self._resolver.use(self._make_backend(uffd), self._loop, self._ring)
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
                       backend=self._resolver.backend.name, read_mode=self._main.read_mode,
                       poll_budget_ns=self._poll_budget_ns,
                       loop=type(self._loop).__module__)

    def _make_backend(self, uffd: Userfaultfd) -> OpExecutor:
        choice = self._backend_choice
        if choice == "ioctl":
            return IoctlExecutor()
        from uffd_aio import resolve_ring  # patched kernels: io_uring writes on the uffd

        if choice == "auto" and not resolve_ring.write_path_available(uffd):
            return IoctlExecutor()
        assert self._ring is not None
        try:
            return resolve_ring.RingWriteExecutor.create(self._ring, uffd)
        except (UffdError, OSError) as exc:
            if choice == "ring":
                raise
            self._log.warning("uffd_aio.ring_backend_unavailable", error=str(exc))
            return IoctlExecutor()

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
    def native_reads(self) -> int:
        """How many more times the native engine reads the uffd in C after a batch it
        served entirely (``Pager(native_reads=...)``); settable at any time (0: none,
        e.g. while a working set is installed)."""
        return self._native_reads

    @native_reads.setter
    def native_reads(self, n: int) -> None:
        if n < 0:
            raise ValueError("native_reads must be >= 0")
        self._native_reads = n

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
        return self._resolver.backend.name

    @property
    def _sync_backend(self) -> OpExecutor:
        """The backend whose resolutions are done when ``execute`` returns."""
        return self._resolver.sync_backend

    @property
    def features(self) -> Feature:
        return self.uffd.features

    @property
    def regions(self) -> list[Region]:
        return list(self._regions)

    @property
    def stats(self) -> PagerStats:
        c = self._counters
        backend = self._resolver.backend
        ioctls = getattr(backend, "ioctls", 0)
        c.ioctls = ioctls
        c.ring_writes = getattr(backend, "ring_writes", 0)
        c.pwrites = getattr(backend, "pwrites", 0)
        snap = c.snapshot(inflight=self._core.running, backlog=len(self._core.backlog),
                          backend=backend.name)
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
        if self._fork_reaper is not None:
            self._fork_reaper.cancel()
            self._fork_reaper = None
        self._abandon = self._resolver.abandon = abandon_inflight
        try:
            await asyncio.wait_for(self._wait_idle(), self._close_timeout)
        except TimeoutError:
            self._log.warning("uffd_aio.close_timeout", inflight=self._core.running,
                              backlog=len(self._core.backlog))
        # Whatever is still in flight gets the error policy now, and it is finished
        # before anything below: unregistering a range or closing the uffd wakes its
        # waiting threads, which then read the memory as if it had never been
        # registered (zeros) instead of getting SIGBUS.
        await self._abort_inflight()
        assert self._ring is not None
        # Unregister, then unmap our own mappings from a worker thread while the reads
        # are still armed: munmap of a range the kernel still counts as registered
        # (EVENT_UNMAP) waits until an UNMAP event is read, and only this loop reads.
        owned = [(r, pieces) for r in self._regions
                 if (pieces := self._release_region(r)) is not None]
        if owned:
            await asyncio.to_thread(lambda: [self._unmap(r, p) for r, p in owned])
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
        while not self._core.idle:
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
            faults = [f for ctx in self._contexts for f in ctx.inflight.values()]
            backlog = self._core.backlog
            if not faults and not backlog:
                return
            while backlog:
                f = backlog.popleft()
                if f.channel.inflight.get(f.page) is f:
                    self._fail(f, PagerClosed("pager closed before the handler ran"))
            tasks = [t for f in faults if isinstance(t := f.task, asyncio.Task) and not t.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                # a task's done-callback (_task_done: policy) runs before wait() returns
                _, stuck = await asyncio.wait(tasks, timeout=grace) if grace > 0 else (
                    None, tasks)
                if stuck:
                    await asyncio.sleep(0)  # let the cancellations be delivered
            self._resolver.flush()
            for ctx in self._contexts:
                for f in list(ctx.inflight.values()):
                    self._fail(f, PagerClosed("pager closed while the fault was in flight"))
            self._resolver.flush()

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
            self._unmap(region, [(addr, addr + length)])
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
        while any(f.region is region for c in self._contexts  # noqa: ASYNC110
                  for f in c.inflight.values()):
            await asyncio.sleep(0.001)
        pieces = self._release_region(region)
        self._regions.remove(region)
        if pieces is not None:  # off the loop thread: see aclose
            await asyncio.to_thread(self._unmap, region, pieces)

    def _release_region(self, region: Region) -> list[tuple[int, int]] | None:
        """Unregister; the pieces of the mapping that are ours to unmap (off the loop
        thread), or None when the region's memory is not ours.

        The pieces are where the region is now, from our uffd's extents: an UNMAP event
        cut the part the application unmapped out of them, a REMAP moved them.  The rest
        of the region's original range is no longer the region's: the kernel may have
        handed it to any later mmap (a new thread's stack or CPython frame stack, a
        malloc arena), and unregistering or unmapping it there would pull memory from
        under its owner."""
        if region.closed:
            return None
        region.closed = True
        self._native_drop(region)
        pieces: list[tuple[int, int]] = []
        for ctx in self._contexts:
            removed = ctx.remove_region(region)
            if ctx is self._main:
                pieces = [(x.start, x.end) for x in removed]
        if not region.remote and self._main is not None and not self._main.uffd.closed:
            for start, end in pieces:
                try:
                    self._main.uffd.unregister(start, end - start)
                except OSError as exc:
                    self._log.debug("uffd_aio.unregister_failed", region=region.name,
                                    start=hex(start), end=hex(end), error=str(exc))
        return pieces if region.owned else None

    @staticmethod
    def _unmap(region: Region, pieces: list[tuple[int, int]]) -> None:
        """Unmap the ``pieces`` left of an owned region (see :meth:`_release_region`) and
        its alias (our own unregistered mapping of its memfd)."""
        for start, end in pieces:
            try:
                ll.munmap(start, end - start)
            except OSError:
                pass
        if region.alias is not None:
            try:
                ll.munmap(region.alias, region.length)
            except OSError:
                pass
        if region.memfd is not None:
            os.close(region.memfd)
            region.memfd = None

    def fault_in_flight(self, address: int) -> bool:
        """A fault on the page at ``address`` is being handled (read, not yet finished).

        The dirty tracker's evictor leaves such pages alone (serving/dirty.py)."""
        return any(address in ctx.inflight for ctx in self._contexts)

    def on_event(self, fn: EventHandler) -> EventHandler:
        """Add a handler for Fork/Remap/Remove/Unmap events of any region (decorator)."""
        self._event_handlers.append(fn)
        return fn

    # ---- reading -----------------------------------------------------------

    def _add_context(self, uffd: Userfaultfd, label: str) -> _Context:
        ctx = _Context(self, uffd, label, local=self._main is None)  # the first is ours
        uffd.page_size_of = ctx.page_size_at  # hugetlbfs EEXIST skips
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
    # The hot path of native sources is C (uffd_aio/binding/csrc/engine.c); these hooks
    # pass each read buffer through the context's engine and drop/close it with the
    # regions.  Everything the engine passes up is dispatched as before.

    def serve_native(self, region: Region, source: NativeSourceArg, *, offset: int,
                     readahead: Readahead,
                     record: TouchRecorder | None = None) -> None:
        """``region.serve_from``: hand ``region`` to its uffd's native engine."""
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
        # one engine range per piece of the region where it is now (UNMAP cut pieces out
        # of it, REMAP moved them; what is at its original range since is not its own)
        engine = ctx.engine
        rids: list[int] = []
        try:
            for x in [x for x in ctx.extents if x.region is region]:
                rid = src.add_to(engine, x.start, x.end - x.start, region.page_size, x.offset)
                rids.append(rid)
                if record is not None:
                    engine.record(rid)
                    ctx.native_rec[rid] = (src, x.offset // region.page_size)
        except BaseException:
            for rid in rids:
                ctx.native_rec.pop(rid, None)
                engine.drop(rid)
            src.close()
            raise
        src.record = record
        self._native[region] = (ctx, rids, src)
        region.fault_handler = src.fallback
        region.eager = None
        self._log.debug("uffd_aio.native_region", region=region.name, source=src.description,
                        readahead=src.ra)

    def _follow_fork(self, child: _Context) -> int:
        """Give a fork child's uffd context (``child``, whose extents the pager copied from
        its parent's) an engine of its own serving every piece of a native region from that
        region's source, as the parent's engine does; returns the pieces served natively.

        The child's address space is a copy of the parent's at the fork: the same addresses
        hold the same regions, so the same sources apply (with fresh resident bits: pages
        the child inherited present just meet EEXIST).  What the engine cannot serve reaches
        the region's handler, as for the parent.  The source stays the parent region's: when
        that region stops being native, :meth:`NativeSource.close` drops the child's pieces
        first.  A piece the engine refuses stays with Python.
        """
        native = self._native
        pieces = [(x, native[x.region][2]) for x in child.extents if x.region in native]
        if not pieces or child.engine is not None:
            return 0
        try:
            child.engine = self._native_engine(child)
        except OSError as exc:
            self._log.warning("uffd_aio.native_fork_failed", uffd=child.uffd.fd, error=str(exc))
            return 0
        ring = self.ring
        served = 0
        for x, src in pieces:
            try:
                rid = src.add_to(child.engine, x.start, x.end - x.start, x.region.page_size,
                                 x.offset)
            except OSError as exc:
                self._log.debug("uffd_aio.native_fork_piece_python", uffd=child.uffd.fd,
                                start=hex(x.start), end=hex(x.end), error=str(exc))
                continue
            src.forks.append((child, rid))
            src.drain = ring.schedule_drain
            if src.record is not None:
                try:
                    child.engine.record(rid)
                except OSError:  # (ENOMEM) the child's faults on it go to Python
                    child.engine.drop(rid)
                    src.forks.pop()
                    continue
                child.native_rec[rid] = (src, x.offset // x.region.page_size)
            served += 1
        self._log.debug("uffd_aio.native_fork", uffd=child.uffd.fd, pieces=served,
                        of=len(pieces))
        return served

    def _reap_forks(self) -> None:
        """Release the contexts of fork children whose address space is gone.

        The kernel sends nothing when a child exits (or execs): its uffd just never
        has a message again, and its context would keep an fd, an armed read and an
        engine for the pager's lifetime.  Each child is probed with one refused ioctl
        (:meth:`Userfaultfd.mm_alive`) after every followed fork and every
        :data:`FORK_REAP_INTERVAL` seconds while children are served."""
        self._fork_reaper = None
        if self._closing:
            return
        for ctx in [c for c in self._contexts if c.forked]:
            if ctx.inflight or ctx.uffd.closed:
                continue  # a handler still runs for it: next time
            probe = _probe_page(ctx)
            if probe is None or ctx.uffd.mm_alive(probe):
                continue
            self._release_fork(ctx)
        if self._fork_reaper is None and any(c.forked for c in self._contexts):
            assert self._loop is not None
            self._fork_reaper = self._loop.call_later(FORK_REAP_INTERVAL, self._reap_forks)

    def _release_fork(self, ctx: _Context) -> None:
        self._stop_reading(ctx)  # the engine is closed and the read cancelled
        for _, _, src in self._native.values():
            src.forks = [(c, rid) for c, rid in src.forks if c is not ctx]
        ctx.uffd.close()
        if ctx.bufring is not None and self._ring is not None and not self._ring.closed:
            self._ring.free_buffers(ctx.bufring.group)
            ctx.bufring = None
        self._contexts.remove(ctx)
        self._counters.forks_released += 1
        self._log.info("uffd_aio.fork_released", label=ctx.label)

    def _native_engine(self, ctx: _Context) -> Engine:
        """A context's engine, on the pager's ring: READs of page-cache misses, and
        io_uring WRITEs on the uffd when the backend is the ring-write one."""
        engine = Engine(ctx.uffd.fd)
        try:
            wfd = -1
            if self._resolver.backend.name == "ring":
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
            if ctx.native_rec:  # (a READ of a dropped region re-served its waiters)
                self._native_touches(ctx)
            addr, keep = ll.buffer_address(buf, writable=True)
            while n := engine.take(addr, len(buf)):
                self._dispatch(ctx, ev_mod.decode(buf, n * ev_mod.MSG_SIZE))
            del keep

    def _native_drop(self, region: Region) -> None:
        entry = self._native.pop(region, None)
        if entry is None:
            return
        ctx, rids, src = entry
        if ctx.engine is not None:
            self._native_touches(ctx)  # (empty between reads: drained after each run)
            waited = ctx.engine.inflight()
            for rid in rids:
                ctx.native_rec.pop(rid, None)
                ctx.engine.drop(rid)  # waits for the region's WRITEs (they read src)
            if waited and self._ring is not None:
                self._ring.schedule_drain()  # what that wait reaped, to its owners
        src.close()

    def _native_close(self, ctx: _Context) -> None:
        if ctx.engine is None:
            return
        for region in [r for r, (c, _, _) in self._native.items() if c is ctx]:
            self._native_drop(region)
        self._native_touches(ctx)
        self._native_retired += ctx.engine.stats()
        ctx.engine.close()  # READs in flight: C frees their buffers when they complete
        ctx.engine = None
        ctx.engine_up = None
        ctx.native_rec.clear()
        if self._native_hooked and not any(c.engine for c in self._contexts) \
                and self._ring is not None:
            self._ring.remove_engine_hook(self._native_completions)
            self._native_hooked = False

    def _native_pass(self, ctx: _Context, nbytes: int) -> int:
        """Run the engine on the nbytes read into ctx.buf; the bytes left for Python."""
        assert ctx.engine is not None
        left = ctx.engine.run(ctx.buf_addr, nbytes, len(ctx.buf), self._native_reads,
                              self._native_budget_ns)
        if ctx.native_rec:
            self._native_touches(ctx)  # before the faults it passed up are dispatched
        return left * ev_mod.MSG_SIZE

    def _native_filter(self, ctx: _Context, data: bytes) -> bytes:
        """Multishot/poll reads: the engine on a copy in ctx.buf (unused in those modes)."""
        n = len(data)
        ctx.buf[:n] = data
        assert ctx.engine is not None
        left = ctx.engine.run(ctx.buf_addr, n, len(ctx.buf)) * ev_mod.MSG_SIZE
        if ctx.native_rec:
            self._native_touches(ctx)
        return bytes(ctx.buf[:left])

    def _native_touches(self, ctx: _Context) -> None:
        """Hand the first touches ctx's engine logged to their sources' ``record``
        callbacks (``serve_from(record=...)``), in the order the engine served them.

        Called right after each engine run, before the faults it passed up are
        dispatched (those reach the region's Python handler, which records its own): the
        order across both is the order the faults were taken."""
        engine = ctx.engine
        if engine is None or not ctx.native_rec:
            return
        rec = ctx.native_rec
        for t in engine.touches():
            entry = rec.get(t.region)
            if entry is None:
                continue
            src, page0 = entry
            cb = src.record
            if cb is None:
                continue
            try:
                cb(page0 + t.page, t.pages, t.write)
            except Exception as exc:  # a recorder must not stop the reads
                self._log.error("uffd_aio.native_record_failed", error=repr(exc))

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

    # ---- dispatch: the core decides (uffd_aio.dispatch), the pager runs handlers --------

    def _dispatch(self, ctx: _Context, msgs: list[ev_mod.Msg]) -> None:
        r = self._resolver
        r.in_batch = True
        r.solo = len(msgs) == 1 and not r.ring_backend
        try:
            for m in msgs:
                if type(m) is PageFaultMsg:
                    self._on_fault(ctx, m)
                else:
                    self._on_event(ctx, m)
        finally:
            r.in_batch = r.solo = False
        if r.pending:
            r.flush()

    def _on_fault(self, ctx: Channel, msg: PageFaultMsg) -> None:
        f = self._core.admit(ctx, msg, time.perf_counter_ns())
        if isinstance(f, Outcome):
            if f is Outcome.STRAY:
                self._stray_fault(ctx, msg)
            return
        self._start(f)

    def _stray_fault(self, ctx: Channel, msg: PageFaultMsg) -> None:
        self._log.error("uffd_aio.stray_fault", uffd=ctx.uffd.fd, address=hex(msg.address))
        page = msg.address & ~(PAGE_SIZE - 1)
        self._resolver.apply_policy(ctx, msg.is_wp, msg.is_minor, page, PAGE_SIZE)

    def _start(self, fault: Fault) -> None:
        """Run the handler of a fault the core started: eagerly, a Task only if it
        suspends."""
        # the core hands back what the pager gave it, the pager's Regions (the core types
        # them as its RegionView protocol) and PageFaults (Dispatcher(make=PageFault)):
        # said with ignores, not casts, on the fault path
        region: Region = fault.region  # type: ignore[assignment]
        handler = region.fault_handler
        if handler is None:
            if not self._warned_default:
                self._warned_default = True
                self._log.warning("uffd_aio.no_handler", region=region.name,
                                  hint="faults get zero pages; set @region.on_fault")
            self._resolver.complete(fault, None)
            return
        self._counters.handler_calls += 1
        try:
            res = handler(fault)  # type: ignore[arg-type]
        except Exception as exc:
            self._fail(fault, exc)
            return
        if type(res) is _CoroType or inspect.isawaitable(res):
            eager = self._eager if region.eager is None else region.eager
            loop = self._loop
            assert loop is not None
            if eager and type(res) is _CoroType:
                try:
                    first = res.send(None)
                except StopIteration as stop:
                    self._resolver.complete(fault, stop.value)
                    return
                except Exception as exc:
                    self._fail(fault, exc)
                    return
                task = loop.create_task(_resume(res, first))
            else:
                task = loop.create_task(_as_coro(res))
            fault.task = task
            task.add_done_callback(functools.partial(self._task_done, fault))
            if self._handler_timeout is not None:
                fault.timer = loop.call_later(self._handler_timeout, self._timeout, fault)
            return
        self._resolver.complete(fault, res)

    def _timeout(self, fault: Fault) -> None:
        fault.timer = None
        task = fault.task
        if isinstance(task, asyncio.Task) and not task.done():
            fault.timed_out = True
            task.cancel()

    def _task_done(self, fault: Fault, task: asyncio.Task[FaultResult]) -> None:
        if fault.timer is not None:
            fault.timer.cancel()
            fault.timer = None
        if fault.channel.inflight.get(fault.page) is not fault:
            # already finished: closing applied the policy to it (_abort_inflight)
            if not task.cancelled() and task.exception() is not None:
                self._log.debug("uffd_aio.late_handler_error", page=hex(fault.page),
                                error=repr(task.exception()))
            return
        if task.cancelled():
            if fault.timed_out:
                self._counters.timeouts += 1
            exc = cancel_error(fault, closing=self._closing, timeout=self._handler_timeout)
            self._fail(fault, exc or asyncio.CancelledError("handler task was cancelled"))
            return
        err = task.exception()
        if err is not None:
            self._fail(fault, err)
        else:
            self._resolver.complete(fault, task.result())

    # ---- errors ------------------------------------------------------------------

    def _fail(self, fault: Fault, exc: BaseException) -> None:
        """A handler failed: log, apply the error policy so no thread hangs."""
        what = failure_outcome(self._on_error, gone=isinstance(exc, RangeGone),
                               abandon=self._abandon, resolved=fault.resolved,
                               closing=self._closing, failed_before=self._failure is not None)
        name = repr(fault) if fault.running else hex(fault.page)
        if what.error:
            self._counters.errors += 1
            self._log.error("uffd_aio.handler_failed", fault=name, policy=self._on_error,
                            error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        elif self._abandon:  # closing for a successor, which re-raises the fault (WAKE)
            self._log.debug("uffd_aio.fault_abandoned", page=hex(fault.page),
                            error=f"{type(exc).__name__}: {exc}")
        else:  # the process exited or dropped the range: no error
            self._log.info("uffd_aio.handler_range_gone", fault=name, error=str(exc))
        if what.record:
            self._failure = exc
        if what.policy:
            self._resolver.apply_policy(fault.channel, fault.is_wp, fault.is_minor, fault.page,
                               fault.page_size)
        self._finish(fault)
        if what.stop:
            assert self._loop is not None
            self._loop.create_task(self.aclose())

    def _finish(self, fault: Fault) -> None:
        core = self._core
        if not core.finish(fault, time.perf_counter_ns()):
            return
        if fault.timer is not None:
            fault.timer.cancel()
            fault.timer = None
        # the task's coroutine holds the fault: drop the reference so that both go by
        # refcount now, not by the cyclic GC (whose passes were ~5% of the fault path
        # and its millisecond pauses the latency tail)
        fault.task = None
        if core.backlog:
            while (nxt := core.next_ready()) is not None:
                self._start(nxt)
        if core.deferred:
            for m in core.take_deferred(fault):
                self._on_fault(fault.channel, m)
        if self._idle_waiter is not None and core.idle:
            w, self._idle_waiter = self._idle_waiter, None
            if not w.done():
                w.set_result(None)

    # ---- non-fault events -------------------------------------------------------

    def _on_event(self, ctx: _Context, msg: ev_mod.Msg) -> None:
        regions = self._core.event(ctx, msg)
        # (the core returns None for those two: the test only narrows msg, off the fault path)
        if regions is None or isinstance(msg, (PageFaultMsg, UnknownMsg)):
            self._log.warning("uffd_aio.unknown_event",
                              kind=msg.event if isinstance(msg, UnknownMsg) else repr(msg))
            return
        if isinstance(msg, Fork):
            if self._follow_forks and not self._closing:
                child = Userfaultfd.from_fd(msg.ufd, ctx.uffd.features)
                cctx = self._add_context(child, f"{ctx.label}/fork{self._counters.forks}")
                cctx.inherit(ctx)
                cctx.forked = True
                if self._native:  # the child's pieces of native regions: an engine too
                    self._follow_fork(cctx)
                self._reap_forks()  # children gone since the last fork, and the timer
                self._log.info("uffd_aio.fork_followed", parent_uffd=ctx.uffd.fd,
                               child_uffd=msg.ufd)
            else:
                os.close(msg.ufd)
        handlers = list(self._event_handlers)
        handlers += [h for r in regions for h in r.event_handlers]
        self._log.debug("uffd_aio.event", uffd=ctx.uffd.fd, message=repr(msg))
        for h in dict.fromkeys(handlers):
            self._run_event_handler(h, msg)

    def _run_event_handler(self, handler: EventHandler, msg: Fork | Remap | Remove | Unmap) -> None:
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


async def _as_coro(aw: Awaitable[_T]) -> _T:
    return await aw


@functools.cache
def _lowest_page() -> int:
    """The lowest page a process may map (vm.mmap_min_addr), read once."""
    try:
        with open("/proc/sys/vm/mmap_min_addr") as f:
            low = int(f.read())
    except (OSError, ValueError):
        low = 65536
    return max(_round_up(low, PAGE_SIZE), PAGE_SIZE)


def _probe_page(ctx: _Context) -> int | None:
    """A page no extent of ``ctx`` covers, for :meth:`Userfaultfd.mm_alive`: the lowest
    one a process may map (nothing of ours is ever that low)."""
    page = _lowest_page()
    for _ in range(16):
        hit = next((x for x in ctx.extents if x.start <= page < x.end), None)
        if hit is None:
            return page
        page = _round_up(hit.end, PAGE_SIZE)
    return None


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to
