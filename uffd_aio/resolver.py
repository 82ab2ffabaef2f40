"""Resolver: executes the dispatch core's resolutions on the pager's backend.

What a handler's outcome becomes in the kernel: the lone-fault fast path (a returned
page is one native ``UFFDIO_COPY``, no cffi allocation per call), the batch queue and
its merge (:func:`~uffd_aio.ops.merge`), EAGAIN retries, explicit ``ev.copy()``...
(:class:`~uffd_aio.dispatch.ExplicitResolver`) and the error policy's ioctls.  The
decisions (which op, which policy) come from :mod:`uffd_aio.dispatch`; the pager
tells it when a batch starts and ends, and gets faults back through ``finish`` (the
fault is done) and ``fail`` (the error policy applies).
"""

from __future__ import annotations

import asyncio
import errno as E
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, cast

from uffd_aio.dispatch import (
    Channel,
    ErrorPolicy,
    Fault,
    count_op,
    default_op,
    moved_op,
    policy_ops,
    result_op,
)
from uffd_aio.errors import BadHandlerResult, FeatureUnavailable, MoveError, ResolveError
from uffd_aio.log import get_logger
from uffd_aio.ops import FaultResult
from uffd_aio.resolve import (
    IoctlExecutor,
    Kind,
    Moved,
    Op,
    OpExecutor,
    copy_buf,
    covering,
    from_buffer,
    merge,
)
from uffd_aio.stats import Counters
from uffd_aio.uffd import (
    EAGAIN_MAX_RETRIES,
    EAGAIN_RETRY_INTERVAL,
    PAGE_SIZE,
    MmChanging,
    RangeGone,
    retry_while_mm_changing,
)

if TYPE_CHECKING:
    from uffd_aio.ring import Ring


class _Holding(Protocol):
    """The ring backend (:class:`~uffd_aio.resolve_ring.RingWriteExecutor`): ``hold``
    keeps its writes queued until the batch is flushed."""

    hold: bool


def _op_address(item: tuple[Fault | None, Op, Channel]) -> int:
    return item[1].address


class Resolver:
    """The resolutions of one pager.  ``backend`` executes ops (``sync_backend``: done
    when ``execute`` returns, for explicit and policy resolutions); ``pending`` is the
    batch being built while ``in_batch``; ``solo``: the batch is one message on a
    synchronous backend, so its resolution runs at once (nothing to merge it with)."""

    def __init__(self, counters: Counters, policy: ErrorPolicy, *,
                 finish: Callable[[Fault], None],
                 fail: Callable[[Fault, BaseException], None], name: str = "pager") -> None:
        self.counters = counters
        self.policy: ErrorPolicy = policy
        self._finish = finish
        self._fail = fail
        self._log = get_logger(component="pager", pager=name)
        self.backend: OpExecutor = IoctlExecutor()
        self.sync_backend: OpExecutor = self.backend
        self.ioctl_backend: IoctlExecutor | None = None  # the lone fault's direct copy
        self.ring_backend = False
        self._holder: _Holding | None = None  # the backend when ring_backend
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ring: Ring | None = None
        self.pending: list[tuple[Fault | None, Op, Channel]] = []
        self.in_batch = False
        self.solo = False
        self.abandon = False  # closing for a successor: no policy, its WAKE re-raises
        self._flush_scheduled = False

    def use(self, backend: OpExecutor, loop: asyncio.AbstractEventLoop, ring: Ring) -> None:
        self.backend = backend
        self.sync_backend = getattr(backend, "sync", backend)
        self.ring_backend = backend.name == "ring"
        self._holder = cast("_Holding", backend) if self.ring_backend else None
        self.ioctl_backend = backend if type(backend) is IoctlExecutor else None
        self.loop = loop
        self.ring = ring

    def complete(self, fault: Fault, result: FaultResult) -> None:
        """The handler returned ``result``: resolve (lone fault) or queue its resolution."""
        if fault.resolved:
            if result is not None:
                self._log.warning("uffd_aio.result_ignored", fault=repr(fault),
                                  reason="the handler already resolved the fault explicitly")
            self._finish(fault)
            return
        if result is None:
            op = default_op(fault)
        else:
            try:
                if type(result) is Moved:
                    op = moved_op(fault, result)
                else:
                    op = result_op(fault, result)
                    b = self.ioctl_backend
                    if self.solo and b is self.backend and not self.pending:
                        # the common case (a lone fault, its handler returned the page):
                        # one native UFFDIO_COPY that wakes, then _resolved's bookkeeping
                        # without _execute; anything but full success (EEXIST,
                        # EAGAIN, a closed uffd: fd -1) goes through _execute, which
                        # handles it (and issues the COPY again: rare)
                        assert b is not None
                        b.ioctls += 1
                        if copy_buf(fault.channel.uffd.fd, op.address, from_buffer(op.data),
                                    op.length, 0) == 0:
                            self._resolved(op, (fault,))
                            return
            except (BadHandlerResult, FeatureUnavailable) as exc:
                self._fail(fault, exc)
                return
        ctx = fault.channel
        if self.solo and not self.pending:
            # the batch's only message: the flush after it would run this op alone
            self.execute(ctx, op, [fault])
            return
        self.queue(fault, op, ctx)

    def queue(self, fault: Fault | None, op: Op, ctx: Channel) -> None:
        self.pending.append((fault, op, ctx))
        if not self.in_batch and not self._flush_scheduled:
            self._flush_scheduled = True
            assert self.loop is not None
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        backend = self._holder
        if backend is None:  # not ring_backend
            self._flush_now()
            return
        # ring writes: one io_uring_enter for the whole batch (with the re-armed read),
        # still before any other code runs, so they keep their order with ioctls
        backend.hold = True
        try:
            self._flush_now()
        finally:
            backend.hold = False
            assert self.ring is not None
            self.ring.flush()

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        pending, self.pending = self.pending, []
        if not pending:
            return
        if len(pending) == 1:
            fault, op, ctx = pending[0]
            self.execute(ctx, op, [fault] if fault is not None else [])
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
            b = self.ioctl_backend
            if b is not self.backend:
                b = None
            c = self.counters
            for fault, op, ctx in pending:
                if b is not None and fault is not None and op.kind is Kind.COPY and not op.wp:
                    # a handler's page(s), as in _complete: one native call when it works
                    b.ioctls += 1
                    if copy_buf(ctx.uffd.fd, op.address, from_buffer(op.data), op.length,
                                 0) == 0:
                        c.resolved_bytes += op.length
                        c.copies += 1
                        c.resolved_pages += 1
                        self._finish(fault)
                        continue
                self.execute(ctx, op, [fault] if fault is not None else [])
            return
        by_ctx: dict[int, tuple[Channel, list[tuple[Fault | None, Op]]]] = {}
        for fault, op, ctx in pending:
            by_ctx.setdefault(id(ctx), (ctx, []))[1].append((fault, op))
        for ctx, items in by_ctx.values():
            merged = merge(op for _, op in items)
            owners: dict[int, list[Fault]] = {id(m): [] for m in merged}
            for fault, op in items:
                m = covering(merged, op.address)
                if m is not None and fault is not None:
                    owners[id(m)].append(fault)
            for m in merged:
                self.execute(ctx, m, owners[id(m)])

    def execute(self, ctx: Channel, op: Op, faults: list[Fault]) -> None:
        if ctx.uffd.closed:  # a retry timer that outlived aclose(): nothing left to do
            for fault in faults:
                self._finish(fault)
            return
        try:
            res = self.backend.execute(ctx.uffd, op)
        except MmChanging:
            self._retry_later(ctx, op, faults)
            return
        except RangeGone:
            for fault in faults:
                self._finish(fault)
            return
        except ResolveError as exc:
            self._resolve_failed(ctx, op, faults, exc)
            return
        if isinstance(res, int):
            self._resolved(op, faults)
        else:
            for fault in faults:
                fault.resolving = True
            res.add_done_callback(lambda f: self._execute_done(ctx, op, faults, f))

    def _execute_done(self, ctx: Channel, op: Op, faults: list[Fault],
                      fut: asyncio.Future[int]) -> None:
        exc = fut.exception()
        if exc is None:
            self._resolved(op, faults)
        elif isinstance(exc, MmChanging):
            self._retry_later(ctx, op, faults)
        elif isinstance(exc, RangeGone):
            for fault in faults:
                self._finish(fault)
        elif isinstance(exc, ResolveError):
            self._resolve_failed(ctx, op, faults, exc)
        else:
            self._resolve_failed(ctx, op, faults, ResolveError(
                E.EIO, str(exc), op=op.kind.value, address=op.address, length=op.length))

    def _resolved(self, op: Op, faults: Sequence[Fault]) -> None:
        c = self.counters
        c.resolved_bytes += op.length
        count_op(c, op.kind)
        for fault in faults:
            c.resolved_pages += 1
            self._finish(fault)

    def _retry_later(self, ctx: Channel, op: Op, faults: list[Fault]) -> None:
        attempts = max((fault.attempts for fault in faults), default=0) + 1
        for fault in faults:
            fault.attempts = attempts
        self.counters.eagain_retries += 1
        if attempts > EAGAIN_MAX_RETRIES:
            self._resolve_failed(ctx, op, faults, ResolveError(
                E.EAGAIN, "address space kept changing", op=op.kind.value, address=op.address,
                length=op.length))
            return
        assert self.loop is not None
        self.loop.call_later(EAGAIN_RETRY_INTERVAL, self.execute, ctx, op, faults)

    def _resolve_failed(self, ctx: Channel, op: Op, faults: list[Fault],
                        exc: ResolveError) -> None:
        if op.kind is Kind.MOVE and isinstance(exc, MoveError) and (
                exc.done or exc.errno == E.EEXIST):
            # a handler's Moved: the faulting page (op.address) was moved, or is there
            # already; what was not moved stays at the source
            self._log.warning("uffd_aio.move_incomplete", address=hex(op.address),
                              moved=exc.done, length=op.length, error=str(exc))
            if not exc.done:  # EEXIST does not wake
                try:
                    ctx.uffd.wake(op.address, faults[0].page_size if faults else PAGE_SIZE)
                except OSError:
                    pass
            self.counters.moves += bool(exc.done)
            for fault in faults:
                self.counters.resolved_pages += 1
                self._finish(fault)
            return
        self._log.error("uffd_aio.resolve_failed", op=op.kind.value, address=hex(op.address),
                        length=op.length, error=str(exc))
        if op.kind is Kind.POISON or not faults:
            for fault in faults:
                self._finish(fault)
            if not faults:
                self.counters.errors += 1
            return
        for fault in faults:
            self._fail(fault, exc)

    def explicit(self, fault: Fault, op: Op) -> int | asyncio.Future[int]:
        """ev.copy()/zero()/... (:class:`~uffd_aio.dispatch.ExplicitResolver`): run now,
        outside batching; the fault counts as resolved."""
        ctx = fault.channel
        try:
            # done when this returns (a handler may rely on it): ring writes -> pwrite
            res = self.sync_backend.execute(ctx.uffd, op)
        except MmChanging:
            assert self.loop is not None
            return asyncio.ensure_future(self._explicit_retry(fault, op), loop=self.loop)
        if isinstance(res, int):
            self._mark_explicit(fault, op, res)
            return res
        if op.address <= fault.page < op.end:
            fault.resolving = True
        # a ring write: EAGAIN arrives in the future; retried as with the ioctl backend
        return asyncio.ensure_future(self._explicit_await(fault, op, res), loop=self.loop)

    async def _explicit_await(self, fault: Fault, op: Op, fut: asyncio.Future[int]) -> int:
        try:
            n = await fut
        except MmChanging:
            return await self._explicit_retry(fault, op)
        self._mark_explicit(fault, op, n)
        return n

    async def _explicit_retry(self, fault: Fault, op: Op) -> int:
        async def attempt() -> int:
            res = self.sync_backend.execute(fault.channel.uffd, op)
            return res if isinstance(res, int) else await res

        def count() -> None:
            self.counters.eagain_retries += 1

        n = await retry_while_mm_changing(attempt, op=op.kind.value, address=op.address,
                                          length=op.length, on_retry=count)
        self._mark_explicit(fault, op, n)
        return n

    def _mark_explicit(self, fault: Fault, op: Op, n: int) -> None:
        c = self.counters
        c.resolved_bytes += n
        count_op(c, op.kind)
        if op.address <= fault.page < op.end and not fault.resolved:
            fault.resolved = True
            c.resolved_pages += 1

    def apply_policy(self, ctx: Channel, is_wp: bool, is_minor: bool, page: int,
                      size: int) -> None:
        if self.abandon:
            return  # the successor's WAKE re-raises the fault
        ops = policy_ops(self.policy, is_wp=is_wp, is_minor=is_minor, page=page, size=size)
        backend = self.sync_backend  # synchronous resolutions
        for op in ops:
            try:
                res = backend.execute(ctx.uffd, op)
                if not isinstance(res, int):
                    res.add_done_callback(lambda f: f.exception())
                count_op(self.counters, op.kind)
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
