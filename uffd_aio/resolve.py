"""Op executors: how a handled fault becomes mapped memory.

An :class:`OpExecutor` implements one of the resolution backends ``Pager(backend=...)``
chooses from (not to be confused with the page stores of :mod:`uffd_aio.stores`,
which fault handlers read data from):

* :class:`IoctlExecutor` (``"ioctl"``, stock kernels): UFFDIO_COPY / ZEROPAGE /
  CONTINUE / WRITEPROTECT / POISON, synchronously on the loop thread (each is a
  few microseconds and never waits for I/O).
* The ring-write executor (``"ring"``, patched kernels, ``Feature.WRITE``) lives
  in :mod:`uffd_aio.resolve_ring`; it has the same ``execute`` contract but
  completes through the ring.

Before execution, the pending resolutions of one batch are sorted and
contiguous ones merged (:func:`merge`): N neighbouring pages cost one ioctl,
which also wakes every waiter of the range once.  MOVE ops are never merged:
each one names its own source range.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from uffd_aio.binding import lowlevel as ll
from uffd_aio.binding.lowlevel import copy_buf, from_buffer
from uffd_aio.ops import Kind, Moved, Op, copy_data, covering, merge, zero_source

__all__ = [
    "IoctlExecutor",
    "Kind",
    "Moved",
    "Op",
    "OpExecutor",
    "copy_buf",
    "covering",
    "execute_move",
    "from_buffer",
    "merge",
    "zero_source",
]

if TYPE_CHECKING:
    import asyncio

    from uffd_aio.uffd import Userfaultfd


class OpExecutor(Protocol):
    """Executes resolution ops as ioctls or writes on the uffd (``Pager(backend=...)``)."""

    name: str

    def execute(self, uffd: Userfaultfd, op: Op) -> int | asyncio.Future[int]:
        """Resolve ``op``; bytes covered, or a future of it.  Raises ResolveError."""


class IoctlExecutor:
    """The stock-kernel executor: one ioctl per merged op (plus retries the kernel asks for)."""

    name = "ioctl"

    def __init__(self) -> None:
        self.ioctls = 0

    def execute(self, uffd: Userfaultfd, op: Op) -> int:
        self.ioctls += 1
        kind = op.kind
        if kind is Kind.COPY:
            # the common case in one native call, no per-call cffi allocation
            # (ua_uffd_copy_buf); anything but full success goes the long way
            if copy_buf(uffd.fd, op.address, from_buffer(copy_data(op)), op.length,
                         2 if op.wp else 0) == 0:
                return op.length
            src, keep = ll.buffer_address(copy_data(op))
            n = uffd.copy(op.address, src, op.length, wp=op.wp)
            del keep
            return n
        if kind is Kind.ZERO:
            zeros = op.buffer
            if zeros is not None:  # hugetlbfs: no zero page, copy zeros
                src, keep = ll.buffer_address(zeros)
                n = uffd.copy(op.address, src, op.length)
                del keep
                return n
            return uffd.zeropage(op.address, op.length)
        if kind is Kind.CONTINUE:
            return uffd.continue_(op.address, op.length, wp=op.wp)
        if kind is Kind.UNPROTECT:
            uffd.writeprotect(op.address, op.length, protect=False)
            return op.length
        if kind is Kind.POISON:
            return uffd.poison(op.address, op.length)
        if kind is Kind.MOVE:
            return execute_move(uffd, op)
        uffd.wake(op.address, op.length)
        return op.length


def execute_move(uffd: Userfaultfd, op: Op) -> int:
    """UFFDIO_MOVE for ``op`` (every executor: the patched kernel's write interface has
    no MOVE, kernel_patches/README.md); bytes moved (less than ``op.length`` only
    when the address space changed meanwhile)."""
    moved = op.data
    if not isinstance(moved, Moved):
        raise TypeError(f"a MOVE op carries a Moved, not {type(moved).__name__}")
    return uffd.move(op.address, moved.src, op.length, allow_src_holes=moved.allow_src_holes)
