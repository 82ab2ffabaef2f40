"""Resolvers: how a handled fault becomes mapped memory.

A :class:`Resolver` implements one of the resolution backends ``Pager(backend=...)``
chooses from (not to be confused with the page stores of :mod:`uffd_aio.handlers`,
which fault handlers read data from):

* :class:`IoctlResolver` (``"ioctl"``, stock kernels): UFFDIO_COPY / ZEROPAGE /
  CONTINUE / WRITEPROTECT / POISON, synchronously on the loop thread (each is a
  few microseconds and never waits for I/O).
* The ring-write resolver (``"ring"``, patched kernels, ``Feature.WRITE``) lives
  in :mod:`uffd_aio.resolve_ring`; it has the same ``execute`` contract but
  completes through the ring.

Before execution, the pending resolutions of one batch are sorted and
contiguous ones merged (:func:`merge`): N neighbouring pages cost one ioctl,
which also wakes every waiter of the range once.  MOVE ops are never merged:
each one names its own source range.
"""

from __future__ import annotations

import enum
import mmap
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeAlias

import attrs

from uffd_aio.ring import _lowlevel as ll
from uffd_aio.ring._lowlevel import copy_buf, from_buffer

if TYPE_CHECKING:
    import asyncio

    from _typeshed import ReadableBuffer

    from uffd_aio.uffd import Userfaultfd


class Kind(enum.Enum):
    COPY = "copy"
    ZERO = "zero"
    CONTINUE = "continue"
    UNPROTECT = "unprotect"
    POISON = "poison"
    WAKE = "wake"
    MOVE = "move"


@attrs.frozen(slots=True)
class Moved:
    """A fault handler's result meaning "move these pages in" (UFFDIO_MOVE, 6.8+).

    ``return uffd_aio.Moved(src)`` from a handler: the kernel moves the private
    anonymous pages at ``src`` (this process's own memory, e.g. a decompression
    buffer) to the faulting page, zero-copy, and the source becomes a hole.
    ``length`` (default: one page) may cover several pages (read-ahead);
    ``allow_src_holes`` skips holes in the source instead of failing (the
    destination pages there stay missing and fault again).  The explicit form
    is ``await ev.move(src, length)``.  Failures raise :class:`MoveError`.
    """

    src: int
    length: int | None = None
    allow_src_holes: bool = False


#: what an :class:`Op` carries: the bytes to copy, the :class:`Moved` of a MOVE, or None
OpData: TypeAlias = "ReadableBuffer | Moved | None"


@attrs.frozen(slots=True)
class Op:
    """One resolution: ``length`` bytes at ``address``.

    ``data``: the buffer for COPY; the :class:`Moved` (its ``src``) for MOVE; for
    ZERO on hugetlbfs, which has no UFFDIO_ZEROPAGE, a zero buffer to copy from
    (:func:`zero_source`).
    """

    kind: Kind
    address: int
    length: int
    data: OpData = None
    wp: bool = False

    @property
    def end(self) -> int:
        return self.address + self.length

    @property
    def buffer(self) -> ReadableBuffer | None:
        """``data`` when it is bytes to copy (COPY, ZERO on hugetlbfs), else None."""
        data = self.data
        return None if data is None or isinstance(data, Moved) else data


def _bytes(op: Op) -> ReadableBuffer:
    """The data of a COPY."""
    buf = op.buffer
    if buf is None:
        raise TypeError(f"{op.kind.value} op without data: {op!r}")
    return buf


def merge(ops: Iterable[Op]) -> list[Op]:
    """Sort by address and merge touching ops of the same kind (and wp flag).

    Overlapping COPYs keep the first data for the overlap: the pages are the
    same page of the same store, and the kernel would report EEXIST anyway.
    """
    out: list[Op] = []
    for op in sorted(ops, key=lambda o: o.address):
        if out:
            last = out[-1]
            if (last.kind is op.kind and last.wp == op.wp and op.address <= last.end
                    and op.kind is not Kind.MOVE
                    and (op.kind is not Kind.ZERO or op.data is None is last.data)):
                if op.end <= last.end:
                    continue  # fully covered
                if op.kind is Kind.COPY:
                    skip = last.end - op.address
                    data = bytes(_bytes(last)) + bytes(memoryview(_bytes(op))[skip:])
                    out[-1] = Op(Kind.COPY, last.address, len(data), data, last.wp)
                else:
                    out[-1] = Op(op.kind, last.address, op.end - last.address, None, last.wp)
                continue
        out.append(op)
    return out


class Resolver(Protocol):
    """Turns resolution ops into ioctls or writes on the uffd."""

    name: str

    def execute(self, uffd: Userfaultfd, op: Op) -> int | asyncio.Future[int]:
        """Resolve ``op``; bytes covered, or a future of it.  Raises ResolveError."""


class IoctlResolver:
    """The stock-kernel resolver: one ioctl per merged op (plus retries the kernel asks for)."""

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
            src, keep = ll.buffer_address(_bytes(op))
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
    """UFFDIO_MOVE for ``op`` (every resolver: the patched kernel's write interface has
    no MOVE, kernel_patches/README.md); bytes moved (less than ``op.length`` only
    when the address space changed meanwhile)."""
    moved = op.data
    if not isinstance(moved, Moved):
        raise TypeError(f"a MOVE op carries a Moved, not {type(moved).__name__}")
    return uffd.move(op.address, moved.src, op.length, allow_src_holes=moved.allow_src_holes)


_zeros: dict[int, mmap.mmap] = {}


def zero_source(length: int) -> memoryview:
    """``length`` zero bytes to UFFDIO_COPY from where UFFDIO_ZEROPAGE does not exist
    (hugetlbfs).  A read-only anonymous mapping never written: it costs no memory
    (every page is the kernel's zero page), one per size, kept for the process."""
    buf = _zeros.get(length)
    if buf is None:
        buf = _zeros[length] = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                         prot=mmap.PROT_READ)
    return memoryview(buf)


def covering(ops: Sequence[Op], address: int) -> Op | None:
    """The merged op covering ``address`` (ops sorted by address)."""
    lo, hi = 0, len(ops)
    while lo < hi:
        mid = (lo + hi) // 2
        if ops[mid].end <= address:
            lo = mid + 1
        else:
            hi = mid
    if lo < len(ops) and ops[lo].address <= address < ops[lo].end:
        return ops[lo]
    return None


# The old names, still used by pager.py (being reworked; it switches to the new names
# then).  Not public: remove them with that rework.
Backend = Resolver
IoctlBackend = IoctlResolver
