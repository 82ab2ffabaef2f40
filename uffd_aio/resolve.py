"""Resolution backends: how a handled fault becomes mapped memory.

* :class:`IoctlBackend` (stock kernels): UFFDIO_COPY / ZEROPAGE / CONTINUE /
  WRITEPROTECT / POISON, synchronously on the loop thread (each is a few
  microseconds and never waits for I/O).
* The ring-write backend (patched kernels, ``Feature.WRITE``) lives in
  :mod:`uffd_aio.resolve_ring`; it has the same ``execute`` contract but
  completes through the ring.

Before execution, the pending resolutions of one batch are sorted and
contiguous ones merged (:func:`merge`): N neighbouring pages cost one ioctl,
which also wakes every waiter of the range once.  MOVE ops are never merged:
each one names its own source range.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from uffd_aio.ops import Kind, Moved, Op, covering, merge, zero_source
from uffd_aio.ring import _lowlevel as ll
from uffd_aio.ring import _native

__all__ = ["Backend", "IoctlBackend", "Kind", "Moved", "Op", "copy_buf", "covering", "execute_move",
           "from_buffer", "merge", "zero_source"]

if TYPE_CHECKING:
    import asyncio

    from uffd_aio.uffd import Userfaultfd


#: ``copy_buf(fd, dst, from_buffer(data), length, mode) == 0``: a whole UFFDIO_COPY in one
#: native call (no per-call cffi allocation); the fast paths of the resolver use it too
copy_buf = _native.lib.ua_uffd_copy_buf
from_buffer = _native.ffi.from_buffer


class Backend(Protocol):
    name: str

    def execute(self, uffd: Userfaultfd, op: Op) -> int | asyncio.Future[int]:
        """Resolve ``op``; bytes covered, or a future of it.  Raises ResolveError."""


class IoctlBackend:
    """The stock-kernel backend: one ioctl per merged op (plus retries the kernel asks for)."""

    name = "ioctl"

    def __init__(self) -> None:
        self.ioctls = 0

    def execute(self, uffd: Userfaultfd, op: Op) -> int:
        self.ioctls += 1
        kind = op.kind
        if kind is Kind.COPY:
            # the common case in one native call, no per-call cffi allocation
            # (ua_uffd_copy_buf); anything but full success goes the long way
            if copy_buf(uffd.fd, op.address, from_buffer(op.data), op.length,
                         2 if op.wp else 0) == 0:
                return op.length
            src, keep = ll.buffer_address(op.data)
            n = uffd.copy(op.address, src, op.length, wp=op.wp)
            del keep
            return n
        if kind is Kind.ZERO:
            if op.data is not None:  # hugetlbfs: no zero page, copy zeros
                src, keep = ll.buffer_address(op.data)
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
    """UFFDIO_MOVE for ``op`` (every backend: the patched kernel's write interface has
    no MOVE, kernel_patches/README.md); bytes moved (less than ``op.length`` only
    when the address space changed meanwhile)."""
    moved: Moved = op.data
    return uffd.move(op.address, moved.src, op.length, allow_src_holes=moved.allow_src_holes)
