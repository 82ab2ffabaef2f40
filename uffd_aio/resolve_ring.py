"""Ring-write executor (``Pager(backend="ring")``) and poll mode (kernels with the uffd_aio series).

On a patched kernel (``Feature.WRITE``, kernel_patches/uapi.md) a fault is
resolved by a positional write to a writable fd of the uffd
(``UFFDIO_WRITE_FD``): ``pwrite(wfd, data, len, dst | op)``.  Here the write
is an io_uring ``IORING_OP_WRITE`` prepared on the pager's :class:`Ring`, so
it leaves in the same ``io_uring_enter`` as the next read of the uffd (the
ring submits once per loop iteration, and right after a batch of completions).

Semantics are those of :class:`uffd_aio.resolve.IoctlExecutor`:

* a short count (partial progress) is continued with the rest of the range;
* ``-EEXIST`` (COPY, ZEROPAGE, CONTINUE, POISON): that page is already there,
  skip it and go on; the kernel does not wake on a failing write, so a
  range with skipped pages is woken with one ``OP_WAKE`` write at the end
  (both done at once with ``pwrite``, in the completion of the ring write);
* ``-EAGAIN`` (the mm is changing: a non-cooperative event is pending):
  :class:`~uffd_aio.uffd.MmChanging`, which the pager retries after the
  events were read;
* ``-ENOENT`` / ``-ESRCH``: :class:`~uffd_aio.uffd.RangeGone`;
* anything else: :class:`~uffd_aio.errors.ResolveError`.

:meth:`RingWriteExecutor.execute` returns a future of the bytes covered (a
light one whose done callbacks run as soon as the completion is reaped).  The
write is submitted before ``execute`` returns (or, for the pager's batches,
right after the batch), so resolutions keep their order with the uffd ioctls
other code issues; the write executes inline in that ``io_uring_enter``.

Poll mode (``Feature.POLL``): :func:`set_poll_budget` sets a context's spin
budget with ``UFFDIO_POLL``.  :func:`probe_write_path` and
:func:`probe_poll_mode` tell ``uffd-aio doctor`` whether the running kernel
has them and why not.
"""

from __future__ import annotations

import asyncio
import errno as E
import functools
import os
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, cast

from uffd_aio import modes, wpos
from uffd_aio.binding import lowlevel as ll
from uffd_aio.errors import FeatureUnavailable, ResolveError
from uffd_aio.log import get_logger
from uffd_aio.modes import Feature
from uffd_aio.resolve import Kind, Op, execute_move
from uffd_aio.ring.ring import _FutureOp
from uffd_aio.uffd import PAGE_SIZE, MmChanging, RangeGone, available_features
from uffd_aio.wpos import WriteOp

if TYPE_CHECKING:
    from uffd_aio.ring import Ring
    from uffd_aio.uffd import Userfaultfd

#: flags of the writer fd: reads on it never block (io_uring needs that), closed on exec
WRITER_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK
#: largest write submitted at once (io_uring's len is 32 bits; the kernel caps a
#: write at INT_MAX & PAGE_MASK anyway and would return a short count)
MAX_WRITE = 1 << 30
#: UFFDIO_POLL accepts at most 10 ms
MAX_POLL_BUDGET_NS = 10_000_000
#: the sysctl that holds the default budget (microseconds)
POLL_SYSCTL = "/proc/sys/vm/userfaultfd_poll_budget_us"

_KIND_OP = {
    Kind.COPY: WriteOp.COPY,
    Kind.ZERO: WriteOp.ZEROPAGE,
    Kind.CONTINUE: WriteOp.CONTINUE,
    Kind.UNPROTECT: WriteOp.UNPROTECT,
    Kind.POISON: WriteOp.POISON,
    Kind.WAKE: WriteOp.WAKE,
}
#: ops for which EEXIST means "this page is already there"
_EEXIST_SKIPS = frozenset({WriteOp.COPY, WriteOp.ZEROPAGE, WriteOp.CONTINUE, WriteOp.POISON})


# ---- capability probes (for the pager and `uffd-aio doctor`) ----------------


def _unavailable(feature: str, what: str) -> FeatureUnavailable:
    return FeatureUnavailable([feature], available=modes.feature_names(available_features()),
                              what=what)


def write_path_available(uffd: Userfaultfd | None = None) -> bool:
    """Whether the running kernel has the write interface (``Feature.WRITE``).

    The interface exists on every initialized uffd of a patched kernel, also
    one handed over by a process that did not ask for the bit.
    """
    if uffd is not None and uffd.has(Feature.WRITE):
        return True
    return bool(available_features() & Feature.WRITE)


@functools.cache
def probe_write_path() -> tuple[bool, str]:
    """(usable, reason): can faults be resolved by io_uring writes on this kernel?

    Checks the feature bit, then really opens a writer fd and submits one
    io_uring WRITE (an ``OP_WAKE`` of one page, a no-op that returns the
    length; EBADF/EINVAL would mean no write path) on a throwaway uffd.
    """
    release = os.uname().release
    try:
        have = available_features()
    except OSError as exc:
        return False, f"userfaultfd unavailable: {exc}"
    if not have & Feature.WRITE:
        return False, (f"kernel {release} lacks UFFD_FEATURE_WRITE (bit 18, the uffd_aio "
                       f"kernel series): faults are resolved with ioctls")
    fd, _ = ll.uffd_open(os.O_CLOEXEC | os.O_NONBLOCK)
    wfd = -1
    ring: ll.RingHandle | None = None
    try:
        rc, _, _ = ll.uffd_api(fd, 0)
        if rc < 0:
            return False, f"UFFDIO_API failed: {os.strerror(-rc)}"
        try:
            wfd = ll.uffd_write_fd(fd, WRITER_FLAGS)
        except OSError as exc:
            return False, f"UFFD_FEATURE_WRITE reported but UFFDIO_WRITE_FD failed: {exc}"
        pos = wpos.encode(PAGE_SIZE, WriteOp.WAKE)  # page 1 is never mapped
        try:
            ring = ll.RingHandle(4, 0)
        except OSError as exc:
            return False, f"io_uring unavailable: {exc}"
        if not ring.prep_rw(ll.OP_WRITE, wfd, 0, PAGE_SIZE, pos, 1):
            return False, "io_uring submission queue full"
        ring.submit()
        res: int | None = None
        for _ in range(1000):
            got = ring.reap()
            if got:
                res = got[0][1]
                break
            os.sched_yield()
        if res is None:
            return False, "io_uring WRITE on the writer fd did not complete"
        if res != PAGE_SIZE:  # OP_WAKE, like UFFDIO_WAKE, does not check the range
            return False, (f"io_uring WRITE (OP_WAKE) on the writer fd returned "
                           f"{os.strerror(-res) if res < 0 else res}, expected {PAGE_SIZE}")
    finally:
        if ring is not None:
            ring.close()
        for f in (wfd, fd):
            if f >= 0:
                os.close(f)
    return True, f"kernel {release} has UFFD_FEATURE_WRITE; io_uring WRITE on UFFDIO_WRITE_FD works"


def read_poll_sysctl() -> int | None:
    """The default spin budget in microseconds (``vm.userfaultfd_poll_budget_us``), if any."""
    try:
        with open(POLL_SYSCTL) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


@functools.cache
def probe_poll_mode() -> tuple[bool, str]:
    """(usable, reason): can faulting threads spin (``UFFD_FEATURE_POLL``) on this kernel?"""
    release = os.uname().release
    try:
        have = available_features()
    except OSError as exc:
        return False, f"userfaultfd unavailable: {exc}"
    if not have & Feature.POLL:
        return False, f"kernel {release} lacks UFFD_FEATURE_POLL (bit 17, the uffd_aio series)"
    fd, _ = ll.uffd_open(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        rc, _, _ = ll.uffd_api(fd, 0)
        if rc < 0:
            return False, f"UFFDIO_API failed: {os.strerror(-rc)}"
        try:
            ll.uffd_poll(fd, 1000)
            old = ll.uffd_poll(fd, 0)
        except OSError as exc:
            return False, f"UFFD_FEATURE_POLL reported but UFFDIO_POLL failed: {exc}"
        if old != 1000:
            return False, f"UFFDIO_POLL did not keep the budget (set 1000 ns, read {old} ns)"
    finally:
        os.close(fd)
    default = read_poll_sysctl()
    dflt = f"default budget {default} us (vm.userfaultfd_poll_budget_us)" if default is not None \
        else "no vm.userfaultfd_poll_budget_us sysctl"
    return True, f"kernel {release} has UFFD_FEATURE_POLL; UFFDIO_POLL works; {dflt}"


def writer_fd(uffd: Userfaultfd) -> int:
    """The uffd's writable fd (``UFFDIO_WRITE_FD``), created on first use, closed with the uffd."""
    wfd = uffd.writer_fd
    if wfd is None:
        try:
            wfd = ll.uffd_write_fd(uffd.fd, WRITER_FLAGS)
        except OSError as exc:
            if exc.errno in (E.EINVAL, E.ENOTTY) and not available_features() & Feature.WRITE:
                raise _unavailable("WRITE", "the ring-write backend") from exc
            raise
        uffd.writer_fd = wfd
    return wfd


def set_poll_budget(uffd: Userfaultfd, budget_ns: int) -> int:
    """UFFDIO_POLL: spin up to ``budget_ns`` (0: off, max 10 ms) before sleeping; the old budget.

    Works on any initialized uffd of a patched kernel, also one handed over by
    a process that did not negotiate ``Feature.POLL``.
    """
    if not 0 <= budget_ns <= MAX_POLL_BUDGET_NS:
        raise ValueError(f"poll budget {budget_ns} ns is outside 0..{MAX_POLL_BUDGET_NS}")
    try:
        return ll.uffd_poll(uffd.fd, budget_ns)
    except OSError as exc:
        if exc.errno in (E.EINVAL, E.ENOTTY) and not available_features() & Feature.POLL:
            raise _unavailable("POLL", "poll mode") from exc
        raise


# ---- the executors -----------------------------------------------------------


def _error(res: int, what: str, address: int, length: int, done: int) -> ResolveError:
    err = -res
    if err == E.EAGAIN:
        return MmChanging(op=what, address=address, length=length, done=done)
    if err in (E.ENOENT, E.ESRCH):
        return RangeGone(err, os.strerror(err), op=what, address=address, length=length)
    return ResolveError(err, os.strerror(err), op=what, address=address, length=length)


class PwriteExecutor:
    """The write interface used synchronously: ``pwrite(2)`` on the writer fd.

    Same contract and semantics as :class:`~uffd_aio.resolve.IoctlExecutor`
    (returns the bytes covered; skips existing pages and wakes the range once;
    :class:`MmChanging` / :class:`RangeGone` / :class:`ResolveError`).  The pager
    uses it where a resolution must be done when the call returns: explicit
    resolutions (``await ev.copy()`` ... a handler may rely on the page being in
    when it continues) and its error policy; :class:`RingWriteExecutor` uses it to
    finish a ring write that came back short.
    """

    name = "pwrite"

    def __init__(self) -> None:
        self.pwrites = 0

    def execute(self, uffd: Userfaultfd, op: Op) -> int:
        if op.kind is Kind.MOVE:  # no write op for MOVE: kernel_patches/README.md
            return execute_move(uffd, op)
        wop = _KIND_OP[op.kind]
        buf = op.buffer
        keep: object = None
        src = 0
        if buf is not None:  # COPY, or ZERO on hugetlbfs (a zero buffer: no zero page)
            wop = WriteOp.COPY
            src, keep = ll.buffer_address(buf)
        ps = PAGE_SIZE if uffd.page_size_of is None else uffd.page_size_of(op.address)
        n = self.run(writer_fd(uffd), wop, op.address, op.length, src,
                     op.wp and wop in wpos.MODE_WP_OPS, page_size=ps)
        del keep
        return n

    def run(self, wfd: int, wop: WriteOp, address: int, length: int, src: int,
            mode_wp: bool, done: int = 0, skipped: bool = False,
            page_size: int = PAGE_SIZE) -> int:
        """Resolve ``[address + done, address + length)``; wake the whole range if pages
        were skipped (now or, ``skipped``, by the caller before)."""
        bits = int(wop) | (wpos.MODE_WP if mode_wp else 0)
        while done < length:
            n = min(length - done, MAX_WRITE)
            rc, got = ll.pwrite(wfd, src + done if src else 0, n, (address + done) | bits)
            self.pwrites += 1
            if rc == 0 and got > 0:
                done += got
            elif rc == -E.EEXIST and wop in _EEXIST_SKIPS:
                done += page_size
                skipped = True
            else:
                raise _error(rc if rc < 0 else -E.EIO, f"UFFDIO_WRITE {wop.name}",
                             address + done, length - done, done)
        if skipped:
            rc, _ = ll.pwrite(wfd, 0, length, address | WriteOp.WAKE)
            self.pwrites += 1
            if rc < 0 and rc not in (-E.ENOENT, -E.ESRCH):
                raise _error(rc, "UFFDIO_WRITE WAKE", address, length, length)
        return length


class _Write(_FutureOp):
    """One resolution through the ring, and its result.

    It is its own future (``fut`` is ``self``), with the part of the
    :class:`asyncio.Future` API the pager uses (``add_done_callback``,
    ``result``, ``exception``, ``done``, ``cancelled``, ``await``), but done
    callbacks run at once when the completion is reaped, not one loop iteration
    later: the pager learns that a fault is resolved in the same pass over the
    completion queue (no extra ``epoll_wait`` and callback round per fault).
    A short count or EEXIST is finished synchronously with ``pwrite``.
    """

    __slots__ = ("_callbacks", "_done", "_exc", "_res", "address", "backend", "length",
                 "loop", "mode_wp", "op", "src", "wfd")

    def __init__(self, backend: RingWriteExecutor, wfd: int, op: WriteOp, address: int,
                 length: int, src: int, keep: object, mode_wp: bool) -> None:
        self.fut = self  # type: ignore[assignment]  # what Ring.close() fails on teardown
        self.keep = keep
        self.what = f"UFFDIO_WRITE {op.name}"
        self.backend = backend
        self.loop = backend.ring.loop
        self.wfd = wfd
        self.op = op
        self.address = address
        self.length = length
        self.src = src
        self.mode_wp = mode_wp
        self._done = False
        self._res = 0
        self._exc: BaseException | None = None
        self._callbacks: list[Callable[[_Write], object]] | None = None

    def submit(self) -> None:
        n = min(self.length, MAX_WRITE)
        pos = self.address | self.op | (wpos.MODE_WP if self.mode_wp else 0)
        self.backend._submit(self.wfd, self.src, n, pos, self)

    # ---- completion (from the ring) -------------------------------------------------

    def __call__(self, res: int, flags: int) -> None:
        if self._done:
            return
        if res == self.length:  # the common case: all resolved (and woken) in one write
            self.set_result(res)
            return
        # a short count or EEXIST: finish the range now, synchronously, with pwrite
        if res > 0:
            done, skipped = res, False
        elif res == -E.EEXIST and self.op in _EEXIST_SKIPS:
            done, skipped = PAGE_SIZE, True
        else:
            self.set_exception(_error(res if res < 0 else -E.EIO, self.what, self.address,
                                      self.length, 0))
            return
        try:
            n = self.backend.sync.run(self.wfd, self.op, self.address, self.length, self.src,
                                      self.mode_wp, done, skipped)
        except Exception as exc:
            self.set_exception(exc)
            return
        self.set_result(n)

    def set_result(self, res: int) -> None:
        self._res = res
        self._finish()

    def set_exception(self, exc: BaseException) -> None:
        self._exc = exc
        self._finish()

    def _finish(self) -> None:
        self._done = True
        self.keep = None
        cbs, self._callbacks = self._callbacks, None
        for cb in cbs or ():
            try:
                cb(self)
            except Exception as exc:  # as asyncio does: report, go on
                self.loop.call_exception_handler(
                    {"message": "uffd_aio ring-write done callback failed", "exception": exc})

    # ---- the future API -------------------------------------------------------------

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def result(self) -> int:
        if not self._done:
            raise asyncio.InvalidStateError("ring write not completed yet")
        if self._exc is not None:
            raise self._exc
        return self._res

    def exception(self) -> BaseException | None:
        if not self._done:
            raise asyncio.InvalidStateError("ring write not completed yet")
        return self._exc

    def add_done_callback(self, cb: Callable[[_Write], object]) -> None:
        if self._done:
            self.loop.call_soon(cb, self)
        elif self._callbacks is None:
            self._callbacks = [cb]
        else:
            self._callbacks.append(cb)

    def __await__(self) -> Generator[asyncio.Future[None], None, int]:
        if not self._done:
            fut: asyncio.Future[None] = self.loop.create_future()

            def wake(_: object) -> None:
                if not fut.done():
                    fut.set_result(None)

            self.add_done_callback(wake)
            yield from fut
        return self.result()


class RingWriteExecutor:
    """Resolve with io_uring WRITEs on the uffd's writer fd (patched kernels).

    ``ring_writes`` counts the WRITE SQEs; ``pwrites`` the synchronous writes
    of :attr:`sync` (the pager's explicit resolutions and error policy, the rest
    of a ring write that came back short); ``ioctls`` counts the UFFDIO_MOVEs,
    which have no write op and go through the ioctl.
    """

    name = "ring"

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        #: set by the pager while it executes a batch (it flushes the ring after it)
        self.hold = False
        self.ring_writes = 0
        self.sync = PwriteExecutor()
        self._log = get_logger(component="resolve_ring",
                                                         ring_fd=ring.fd)

    @property
    def pwrites(self) -> int:
        return self.sync.pwrites

    ioctls = 0

    @classmethod
    def create(cls, ring: Ring, uffd: Userfaultfd) -> RingWriteExecutor:
        """The executor for ``uffd``; :class:`FeatureUnavailable` on a kernel without the series."""
        if not write_path_available(uffd):
            raise _unavailable("WRITE", "backend='ring' (io_uring writes on the uffd)")
        if not ring.supports(ll.OP_WRITE):
            raise FeatureUnavailable(["IORING_OP_WRITE"], available=[],
                                     what="backend='ring'")
        backend = cls(ring)
        wfd = writer_fd(uffd)
        backend._log.debug("uffd_aio.ring_backend", uffd=uffd.fd, writer_fd=wfd)
        return backend

    def _submit(self, wfd: int, addr: int, length: int, pos: int, cb: _Write) -> None:
        self.ring.submit_rw(ll.OP_WRITE, wfd, addr, length, pos, cb)
        self.ring_writes += 1

    def execute(self, uffd: Userfaultfd, op: Op) -> int | asyncio.Future[int]:
        if op.kind is Kind.MOVE:  # no write op for MOVE: the ioctl (kernel_patches/README.md)
            self.ioctls += 1
            return execute_move(uffd, op)
        wop = _KIND_OP[op.kind]
        wfd = uffd.writer_fd
        if wfd is None:
            wfd = writer_fd(uffd)  # a fork child's uffd: its own writer fd
        buf = op.buffer
        keep: object = None
        src = 0
        if buf is not None:  # COPY, or ZERO on hugetlbfs (a zero buffer: no zero page)
            wop = WriteOp.COPY
            src, keep = ll.buffer_address(buf)
        # like the ioctl backend, ``wp`` only means something for COPY and CONTINUE
        w = _Write(self, wfd, wop, op.address, op.length, src, keep,
                   op.wp and wop in wpos.MODE_WP_OPS)
        w.submit()
        if not self.hold:
            # submit now: the write reaches the kernel before any other code runs, in
            # order with the uffd ioctls that code may issue (a handler's WP after an
            # unprotect...); with the next read if one is prepared
            self.ring.flush()
        # duck-typed future: see _Write (callbacks run when the completion is reaped)
        return cast("asyncio.Future[int]", w)
