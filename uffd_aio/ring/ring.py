"""Ring: io_uring on the running asyncio (or uvloop) event loop.

* Submission is batched: prepping an SQE only marks the ring dirty; one
  ``io_uring_submit`` runs per loop iteration (``call_soon``), or right after
  a batch of completions was processed.
* Completions are reaped in C, a batch per call, whenever the ring fd is
  readable (``loop.add_reader``).  The CQ is always drained to empty, even
  when the wakeup turns out spurious (caio's lesson).
* Operations are keyed by user_data: either a callback (the uffd read path,
  multishot reads) or a future (``await ring.read(...)``).  Cancelling an
  awaiting coroutine submits IORING_OP_ASYNC_CANCEL for its SQE; buffers
  stay pinned until the kernel posts the CQE.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from uffd_aio.binding import lowlevel as ll
from uffd_aio.binding.watchdog import StallWatchdog
from uffd_aio.log import get_logger

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

Callback = Callable[[int, int], None]
"""A completion callback: ``cb(res, cqe_flags)``; res is >= 0 or -errno."""

_CANCEL_UD = 0  # user_data of our own cancel SQEs: their CQEs are ignored
_REDRAIN_ROUNDS = 32  # reap/submit rounds per wakeup before yielding to the loop
REDRAIN_ROUNDS = _REDRAIN_ROUNDS  # the default of Ring.redrain_rounds


class _FutureOp:
    """Completion -> future (result or OSError); keeps buffers alive until the CQE."""

    __slots__ = ("fut", "keep", "what")

    def __init__(self, fut: asyncio.Future[int], keep: object, what: str) -> None:
        self.fut, self.keep, self.what = fut, keep, what

    def __call__(self, res: int, flags: int) -> None:
        if self.fut.done():
            return
        if res < 0:
            self.fut.set_exception(ll.oserror(res, self.what))
        else:
            self.fut.set_result(res)


#: id(loop) -> that loop's shared ring (Ring.shared); an entry leaves when the ring closes
_SHARED: dict[int, Ring] = {}


class Ring:
    """One io_uring instance attached to one event loop.

    ``entries``: SQ size.  ``coop_taskrun`` / ``single_issuer`` are used when
    the kernel has them (we fall back without); ``sqpoll`` starts a kernel
    submission thread (no submit syscalls, one busy core).
    """

    def __init__(
        self,
        entries: int = 256,
        *,
        coop_taskrun: bool = True,
        single_issuer: bool = True,
        sqpoll: bool = False,
        sq_thread_idle_ms: int = 1000,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._loop = loop or asyncio.get_running_loop()
        wanted = 0
        if coop_taskrun:
            wanted |= ll.SETUP_COOP_TASKRUN
        if single_issuer:
            wanted |= ll.SETUP_SINGLE_ISSUER
        if sqpoll:
            wanted |= ll.SETUP_SQPOLL
        self._h = self._setup(entries, wanted, sq_thread_idle_ms)
        self.fd = self._h.fd
        self.setup_flags = self._h.flags
        self.features = self._h.features
        try:
            self._supported = self._h.probe(64)
        except OSError:
            self._supported = [False] * 64
        self._log = get_logger(component="ring", ring_fd=self.fd)
        self._ops: dict[int, Callback] = {}
        self._next_ud = 1
        self._dirty = False
        self._flush_scheduled = False
        self._in_reap = False
        #: reap/submit rounds per wakeup (``_REDRAIN_ROUNDS``); a working-set replay
        #: lowers it to 1 while it installs a set (HandoffServer: docs/backends.md)
        self.redrain_rounds = _REDRAIN_ROUNDS
        self._closed = False
        self._fixed_keep: list[WriteableBuffer] = []
        self._watchdog: StallWatchdog | None = None
        self._bufrings: dict[int, ll.BufRing] = {}
        #: native engines' completion hooks (attach_engine); run after a reap in which
        #: an engine queued messages for Python
        self._engine_hooks: list[Callable[[], None]] = []
        #: references to a loop's shared ring (Ring.shared); close() frees it at the last
        self._refs = 1
        self._shared = False
        self.submits = 0
        self.completions = 0
        self._loop.add_reader(self.fd, self._on_readable)
        self._log.debug("uffd_aio.ring_opened", setup_flags=hex(self.setup_flags),
                        entries=entries)

    @classmethod
    def shared(cls, loop: asyncio.AbstractEventLoop | None = None) -> Ring:
        """The loop's shared ring: one io_uring per loop for the pagers, the server and
        the stores that do I/O, so one ``io_uring_enter`` submits and reaps for all.

        Each call takes a reference and each ``close()`` gives one back; the ring is freed
        with the last.  Use a ring of your own (``Ring(...)``) for other setup flags
        (``sqpoll``) or a registered-buffer table of your own."""
        loop = loop or asyncio.get_running_loop()
        ring = _SHARED.get(id(loop))
        if ring is None or ring._closed or ring._loop is not loop:
            ring = cls(loop=loop)
            ring._shared = True
            ring._refs = 0
            _SHARED[id(loop)] = ring
        ring._refs += 1
        return ring

    @property
    def is_shared(self) -> bool:
        """Whether this is a loop's shared ring (:meth:`shared`)."""
        return self._shared

    @staticmethod
    def _setup(entries: int, flags: int, idle: int) -> ll.RingHandle:
        # drop optional flags the kernel rejects, most exotic first
        candidates = [flags]
        for bit in (ll.SETUP_SINGLE_ISSUER, ll.SETUP_COOP_TASKRUN):
            if candidates[-1] & bit:
                candidates.append(candidates[-1] & ~bit)
        last: OSError | None = None
        for f in candidates:
            try:
                return ll.RingHandle(entries, f, idle)
            except OSError as exc:
                if exc.errno != 22:  # EINVAL: flag unknown to this kernel
                    raise
                last = exc
        assert last is not None
        raise last

    # ---- capabilities ------------------------------------------------

    def supports(self, opcode: int) -> bool:
        """Whether the kernel's io_uring knows ``opcode`` (IORING_REGISTER_PROBE)."""
        return 0 <= opcode < len(self._supported) and self._supported[opcode]

    @property
    def probed_ops(self) -> dict[str, bool]:
        return {name: self.supports(op) for op, name in ll.OPCODE_NAMES.items()}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- submission --------------------------------------------------

    def _alloc_ud(self, cb: Callback) -> int:
        ud = self._next_ud
        self._next_ud = ud + 1
        self._ops[ud] = cb
        return ud

    def _mark_dirty(self) -> None:
        self._dirty = True
        if not self._flush_scheduled and not self._in_reap:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _prep(self, prep: Callable[[], bool]) -> None:
        if self._closed:
            raise RuntimeError("ring is closed")
        if not prep():
            self._submit_now()  # SQ full: push what we have, then retry
            if not prep():
                raise BlockingIOError(ll.EBUSY, "io_uring submission queue is full")
        self._mark_dirty()

    def _submit_now(self) -> None:
        self._dirty = False
        if self._closed:
            return
        try:
            self._h.submit()
        except OSError as exc:
            if exc.errno not in (11, 16, 4):  # EAGAIN/EBUSY/EINTR: retried next flush
                raise
            self._dirty = True
        self.submits += 1

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._dirty or (self._engine_hooks and not self._closed and self._h.sq_ready()):
            self._submit_now()

    def flush(self) -> None:
        """Submit queued SQEs now (normally done once per loop iteration)."""
        self._flush()

    def submit_rw(
        self, op: int, fd: int, addr: int, length: int, offset: int, cb: Callback,
        *, fixed_file: bool = False, buf_index: int = -1,
    ) -> int:
        """Queue a read/write-family SQE with a completion callback; returns its user_data."""
        ud = self._alloc_ud(cb)
        flags = ll.IOSQE_FIXED_FILE if fixed_file else 0
        h = self._h
        try:
            # fast path (the uffd read is re-armed per batch): prep directly; the
            # closure and the SQ-full retry only when the ring is closed or full
            if self._closed or not h.prep_rw(op, fd, addr, length, offset, ud, flags, buf_index):
                self._prep(lambda: h.prep_rw(op, fd, addr, length, offset, ud, flags, buf_index))
            else:
                self._mark_dirty()
        except BaseException:
            del self._ops[ud]
            raise
        return ud

    def submit_read_multishot(self, fd: int, group: int, cb: Callback, length: int = 0) -> int:
        """Multishot read (6.7+) selecting buffers from ``group``; ``cb`` runs per CQE."""
        ud = self._alloc_ud(cb)
        try:
            self._prep(lambda: self._h.prep_read_multishot(fd, length, -1, group, ud))
        except BaseException:
            del self._ops[ud]
            raise
        return ud

    def submit_poll(self, fd: int, mask: int, cb: Callback) -> int:
        ud = self._alloc_ud(cb)
        try:
            self._prep(lambda: self._h.prep_poll(fd, mask, ud))
        except BaseException:
            del self._ops[ud]
            raise
        return ud

    def cancel(self, ud: int) -> None:
        """Ask the kernel to cancel the SQE ``ud``; its CQE still arrives (-ECANCELED or result)."""
        if ud in self._ops and not self._closed:
            self._prep(lambda: self._h.prep_cancel(ud, _CANCEL_UD))

    def pending(self) -> int:
        return len(self._ops)

    # ---- futures API -------------------------------------------------

    async def _await(self, ud: int, fut: asyncio.Future[int]) -> int:
        try:
            return await fut
        except asyncio.CancelledError:
            self.cancel(ud)
            raise

    def _rw_future(self, op: int, fd: int, buf: ReadableBuffer, offset: int, *, writable: bool,
                   what: str, buf_index: int = -1, fixed_file: bool = False
                   ) -> tuple[int, asyncio.Future[int]]:
        addr, keep = ll.buffer_address(buf, writable=writable)
        fut: asyncio.Future[int] = self._loop.create_future()
        ud = self.submit_rw(op, fd, addr, len(keep), offset, _FutureOp(fut, keep, what),
                            buf_index=buf_index, fixed_file=fixed_file)
        return ud, fut

    async def read(self, fd: int, buf: WriteableBuffer, offset: int = -1) -> int:
        """Read into writable ``buf`` at ``offset`` (-1: current position); bytes read."""
        ud, fut = self._rw_future(ll.OP_READ, fd, buf, offset, writable=True,
                                  what=f"io_uring read fd={fd}")
        return await self._await(ud, fut)

    async def write(self, fd: int, buf: ReadableBuffer, offset: int = -1) -> int:
        """Write ``buf`` at ``offset``; bytes written."""
        ud, fut = self._rw_future(ll.OP_WRITE, fd, buf, offset, writable=False,
                                  what=f"io_uring write fd={fd}")
        return await self._await(ud, fut)

    async def read_fixed(self, fd: int, index: int, offset: int = -1,
                         length: int | None = None) -> int:
        """Read into registered buffer ``index`` (see :meth:`register_buffers`)."""
        buf = self._fixed_keep[index]
        addr, keep = ll.buffer_address(buf, writable=True)
        n = len(keep) if length is None else length
        fut: asyncio.Future[int] = self._loop.create_future()
        ud = self.submit_rw(ll.OP_READ_FIXED, fd, addr, n, offset,
                            _FutureOp(fut, keep, f"io_uring read_fixed fd={fd}"), buf_index=index)
        return await self._await(ud, fut)

    async def write_fixed(self, fd: int, index: int, offset: int = -1,
                          length: int | None = None) -> int:
        buf = self._fixed_keep[index]
        addr, keep = ll.buffer_address(buf, writable=True)
        n = len(keep) if length is None else length
        fut: asyncio.Future[int] = self._loop.create_future()
        ud = self.submit_rw(ll.OP_WRITE_FIXED, fd, addr, n, offset,
                            _FutureOp(fut, keep, f"io_uring write_fixed fd={fd}"), buf_index=index)
        return await self._await(ud, fut)

    async def _vec(self, op: int, fd: int, bufs: Sequence[ReadableBuffer], offset: int,
                   writable: bool, what: str) -> int:
        import array

        keeps = []
        iov = array.array("Q")
        for b in bufs:
            addr, keep = ll.buffer_address(b, writable=writable)
            keeps.append(keep)
            iov.extend((addr, len(keep)))
        iov_addr, iov_keep = ll.buffer_address(iov)
        keeps.append(iov_keep)
        fut: asyncio.Future[int] = self._loop.create_future()
        ud = self.submit_rw(op, fd, iov_addr, len(bufs), offset, _FutureOp(fut, (keeps, iov), what))
        return await self._await(ud, fut)

    async def readv(self, fd: int, bufs: Sequence[WriteableBuffer], offset: int = -1) -> int:
        return await self._vec(ll.OP_READV, fd, bufs, offset, True, f"io_uring readv fd={fd}")

    async def writev(self, fd: int, bufs: Sequence[ReadableBuffer], offset: int = -1) -> int:
        return await self._vec(ll.OP_WRITEV, fd, bufs, offset, False, f"io_uring writev fd={fd}")

    async def poll(self, fd: int, mask: int) -> int:
        """Wait until ``fd`` has one of the ``mask`` events (select.POLL*); returns revents."""
        fut: asyncio.Future[int] = self._loop.create_future()
        ud = self.submit_poll(fd, mask, _FutureOp(fut, None, f"io_uring poll fd={fd}"))
        return await self._await(ud, fut)

    async def nop(self) -> int:
        fut: asyncio.Future[int] = self._loop.create_future()
        ud = self._alloc_ud(_FutureOp(fut, None, "io_uring nop"))
        self._prep(lambda: self._h.prep_nop(ud))
        return await self._await(ud, fut)

    def register_buffers(self, bufs: Sequence[WriteableBuffer]) -> None:
        """Register writable buffers for read_fixed/write_fixed (pinned until close or
        :meth:`unregister_buffers`).  A ring has one table: EBUSY if one is registered."""
        addrs, lens, keeps = [], [], []
        for b in bufs:
            addr, keep = ll.buffer_address(b, writable=True)
            addrs.append(addr)
            lens.append(len(keep))
            keeps.append(b)
        self._h.register_buffers(addrs, lens)
        self._fixed_keep = keeps

    def unregister_buffers(self) -> None:
        """Give the registered-buffer table back (its buffers are no longer pinned)."""
        if self._closed or not self._fixed_keep:
            return
        self._h.unregister_buffers()
        self._fixed_keep = []

    def register_files(self, fds: Sequence[int]) -> None:
        self._h.register_files(fds)

    def provide_buffers(self, group: int | None, nbufs: int, size: int) -> ll.BufRing:
        """A provided-buffer ring for multishot reads (kernel 5.19+).

        ``group`` None: the lowest group id not in use on this ring (several pagers
        may share one ring).  Release it with :meth:`free_buffers`.
        """
        if group is None:
            group = next((g for g in range(1, 0x10000) if g not in self._bufrings), None)
            if group is None:
                raise BlockingIOError(ll.EBUSY, "every buffer group id of the ring is in use")
        br = self._h.bufring_new(group, nbufs, size)
        self._bufrings[group] = br
        return br

    def free_buffers(self, group: int) -> None:
        """Unregister and free a provided-buffer ring (a read still armed on it then
        fails with ENOBUFS instead of writing into freed memory)."""
        br = self._bufrings.pop(group, None)
        if br is not None and not self._closed:
            br.close()

    # ---- completion --------------------------------------------------

    def _on_readable(self) -> None:
        if self._closed:  # a drain scheduled (schedule_drain) before close()
            return
        if self._watchdog is not None:
            self._watchdog.beat()
        # Reap, submit what the callbacks queued, and reap again while that keeps
        # producing completions (bounded): a uffd read submitted after a resolve
        # usually completes inside that io_uring_enter (the woken thread has faulted
        # again by then), and a multishot read posts its next CQE when the resolving
        # ioctl returns, so the next fault is served without another trip through
        # the event loop's selector.
        for _ in range(self.redrain_rounds):
            self._in_reap = True
            try:
                n = self.drain()
            finally:
                self._in_reap = False
            if self._dirty or (self._engine_hooks and self._h.sq_ready()):
                self._submit_now()
            if not n:
                return

    # ---- native engines (uffd_aio/binding/csrc/engine.c) -------------------
    # An engine attached to this ring prepares its own SQEs (io_uring READs of
    # page-cache misses, WRITEs on a uffd's writer fd) with user_data values
    # that have the top bit set (ring_engine.h); the reaper serves their CQEs
    # in C, so they never reach this class.  It only has to submit what the
    # engines prepared, and run their hooks when they queued work for Python.

    @property
    def native_handle(self) -> ll.CData:
        """The C ring (``struct ua_ring *``) an engine attaches to."""
        if self._closed:
            raise RuntimeError("ring is closed")
        return self._h.native

    def add_engine_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` after a reap in which a native engine queued messages for Python."""
        self._engine_hooks.append(hook)

    def remove_engine_hook(self, hook: Callable[[], None]) -> None:
        if hook in self._engine_hooks:
            self._engine_hooks.remove(hook)

    def schedule_drain(self) -> None:
        """Reap soon, even if the ring fd does not become readable again: an engine that
        waited for its own CQEs (dropping a region waits for its WRITEs) may have reaped
        other completions into the C stash, and queued work for Python."""
        if not self._closed:
            self._loop.call_soon(self._on_readable)

    def _run_engine_hooks(self) -> None:
        if self._closed or not self._h.engine_flags():
            return
        for hook in list(self._engine_hooks):
            try:
                hook()
            except Exception as exc:
                self._loop.call_exception_handler(
                    {"message": "uffd_aio native engine hook failed", "exception": exc})

    def drain(self) -> int:
        """Reap and dispatch every completion that is ready now; returns how many."""
        total = 0
        ops = self._ops
        while True:
            batch = self._h.reap()
            if not batch:
                if self._engine_hooks:  # a reap of engine CQEs only
                    self._run_engine_hooks()
                return total
            total += len(batch)
            for ud, res, flags in batch:
                if ud == _CANCEL_UD:
                    continue
                cb = ops.get(ud) if flags & ll.CQE_F_MORE else ops.pop(ud, None)
                if cb is None:
                    continue
                try:
                    cb(res, flags)
                except Exception as exc:  # a broken callback must not stop the reaper
                    self._loop.call_exception_handler(
                        {"message": "uffd_aio ring completion callback failed",
                         "exception": exc})
            self.completions += len(batch)
            if self._engine_hooks:
                self._run_engine_hooks()
            if len(batch) < self._h.batch:
                return total

    def start_watchdog(self, timeout: float, message: str, uffd: int = -1) -> None:
        """Write ``message`` to stderr when work waits ``timeout`` s for this ring's loop.

        A native thread does the watching, so it works when no Python code can
        run (the GIL deadlock of docs/gil.md).
        """
        if self._watchdog is None:
            self._watchdog = StallWatchdog(self.fd, uffd, timeout, message)

    @property
    def stalls_reported(self) -> int:
        return self._watchdog.fired if self._watchdog is not None else 0

    # ---- teardown ----------------------------------------------------

    def close(self) -> None:
        """Detach from the loop and free the ring; pending futures get PagerClosed-style errors.

        Pending operations are cancelled by the kernel when the ring is freed.
        """
        if self._closed:
            return
        self._refs -= 1
        if self._refs > 0:  # a shared ring: others still use it
            return
        if self._shared and _SHARED.get(id(self._loop)) is self:
            del _SHARED[id(self._loop)]
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None
        try:
            self._loop.remove_reader(self.fd)
        except Exception:  # loop already closed
            pass
        for cb in list(self._ops.values()):
            if isinstance(cb, _FutureOp) and not cb.fut.done():
                cb.fut.set_exception(OSError(125, "ring closed: " + os.strerror(125)))
        self._ops.clear()
        self._engine_hooks.clear()
        for br in self._bufrings.values():
            br.close()
        self._bufrings.clear()
        self._h.close()
        self._log.debug("uffd_aio.ring_closed", submits=self.submits,
                        completions=self.completions)
