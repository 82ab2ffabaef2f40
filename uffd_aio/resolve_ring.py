"""Ring-write resolution backend and poll mode (kernels with the uffd_aio series).

On a patched kernel (``Feature.WRITE``, kernel_patches/uapi.md) a fault is
resolved by a positional write to a writable fd of the uffd
(``UFFDIO_WRITE_FD``): ``pwrite(wfd, data, len, dst | op)``.  Here the write
is an io_uring ``IORING_OP_WRITE`` prepared on the pager's :class:`Ring`, so
it leaves in the same ``io_uring_enter`` as the next read of the uffd (the
ring submits once per loop iteration, and right after a batch of completions).

Semantics are those of :class:`uffd_aio.resolve.IoctlBackend`:

* a short count (partial progress) is continued with the rest of the range;
* ``-EEXIST`` (COPY, ZEROPAGE, CONTINUE, POISON): that page is already there,
  skip it and go on; the kernel does not wake on a failing write, so a
  range with skipped pages is woken with one ``OP_WAKE`` write at the end;
* ``-EAGAIN`` (the mm is changing: a non-cooperative event is pending):
  :class:`~uffd_aio.uffd.MmChanging`, which the pager retries after the
  events were read;
* ``-ENOENT`` / ``-ESRCH``: :class:`~uffd_aio.uffd.RangeGone`;
* anything else: :class:`~uffd_aio.errors.ResolveError`.

:meth:`RingWriteBackend.execute` returns a future of the bytes covered.

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
from typing import TYPE_CHECKING, Any

import structlog

from uffd_aio import modes, wpos
from uffd_aio.errors import FeatureUnavailable, ResolveError
from uffd_aio.modes import Feature
from uffd_aio.resolve import IoctlBackend, Kind, Op
from uffd_aio.ring import _lowlevel as ll
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


# ---- the backend -------------------------------------------------------------


def _error(res: int, what: str, address: int, length: int, done: int) -> ResolveError:
    err = -res
    if err == E.EAGAIN:
        return MmChanging(op=what, address=address, length=length, done=done)
    if err in (E.ENOENT, E.ESRCH):
        return RangeGone(err, os.strerror(err), op=what, address=address, length=length)
    return ResolveError(err, os.strerror(err), op=what, address=address, length=length)


class _Write(_FutureOp):
    """One resolution driven to the end through the ring: continues short counts,
    skips pages that exist, wakes once at the end if it skipped any."""

    __slots__ = ("address", "backend", "done", "length", "mode_wp", "op", "skipped", "src",
                 "waking", "wfd")

    def __init__(self, backend: RingWriteBackend, fut: asyncio.Future[int], wfd: int,
                 op: WriteOp, address: int, length: int, src: int, keep: Any,
                 mode_wp: bool) -> None:
        super().__init__(fut, keep, f"UFFDIO_WRITE {op.name}")
        self.backend = backend
        self.wfd = wfd
        self.op = op
        self.address = address
        self.length = length
        self.src = src
        self.mode_wp = mode_wp
        self.done = 0
        self.skipped = False
        self.waking = False

    def submit(self) -> None:
        if self.waking:
            pos = wpos.encode(self.address, WriteOp.WAKE)
            self.backend._submit(self.wfd, 0, self.length, pos, self)
            return
        done = self.done
        n = min(self.length - done, MAX_WRITE)
        pos = (self.address + done) | self.op | (wpos.MODE_WP if self.mode_wp else 0)
        self.backend._submit(self.wfd, self.src + done if self.src else 0, n, pos, self)

    def __call__(self, res: int, flags: int) -> None:
        fut = self.fut
        if fut.done():
            return
        if self.waking:  # the final wake after skipped pages; a vanished range is fine
            if res < 0 and res not in (-E.ENOENT, -E.ESRCH):
                fut.set_exception(_error(res, "UFFDIO_WRITE WAKE", self.address, self.length,
                                         self.done))
            else:
                fut.set_result(self.done)
            return
        if res > 0:
            self.done += res
        elif res == -E.EEXIST and self.op in _EEXIST_SKIPS:
            self.done += PAGE_SIZE
            self.skipped = True
        else:
            left = self.length - self.done
            fut.set_exception(_error(res if res < 0 else -E.EIO, self.what,
                                     self.address + self.done, left, self.done))
            return
        if self.done < self.length:
            try:
                self.submit()
            except BaseException as exc:
                fut.set_exception(exc)
            return
        self.done = self.length
        if self.skipped:
            self.waking = True
            try:
                self.submit()
            except BaseException as exc:
                fut.set_exception(exc)
            return
        fut.set_result(self.length)


class RingWriteBackend:
    """Resolve with io_uring WRITEs on the uffd's writer fd (patched kernels).

    ``ring_writes`` counts the WRITE SQEs (continuations and wakes included);
    ``ioctls`` counts what went through :attr:`fallback`, the ioctl backend the
    pager uses where it needs a synchronous answer (its error policy).
    """

    name = "ring"

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.ring_writes = 0
        self.fallback = IoctlBackend()
        self._log = structlog.get_logger("uffd_aio").bind(component="resolve_ring",
                                                         ring_fd=ring.fd)

    @property
    def ioctls(self) -> int:
        return self.fallback.ioctls

    @classmethod
    def create(cls, ring: Ring, uffd: Userfaultfd) -> RingWriteBackend:
        """The backend for ``uffd``; :class:`FeatureUnavailable` on a kernel without the series."""
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

    def execute(self, uffd: Userfaultfd, op: Op) -> asyncio.Future[int]:
        wop = _KIND_OP[op.kind]
        wfd = uffd.writer_fd
        if wfd is None:
            wfd = writer_fd(uffd)  # a fork child's uffd: its own writer fd
        if op.kind is Kind.COPY:
            src, keep = ll.buffer_address(op.data)
        else:
            src, keep = 0, None
        fut: asyncio.Future[int] = self.ring.loop.create_future()
        # like the ioctl backend, ``wp`` only means something for COPY and CONTINUE
        w = _Write(self, fut, wfd, wop, op.address, op.length, src, keep,
                   op.wp and wop in wpos.MODE_WP_OPS)
        w.submit()
        return fut
