"""Resolutions as values (pure): what to map where, and how a batch of them merges.

:class:`Op` is one resolution (COPY, ZERO, CONTINUE, UNPROTECT, POISON, WAKE, MOVE of
``length`` bytes at ``address``); :func:`merge` sorts a batch and joins touching ops
so N neighbouring pages cost one ioctl.  Nothing here touches the kernel: the
backends that execute ops are in :mod:`uffd_aio.resolve`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeAlias, final

import attrs

if TYPE_CHECKING:
    import mmap

    from _typeshed import ReadableBuffer


class Kind(enum.Enum):
    COPY = "copy"
    ZERO = "zero"
    CONTINUE = "continue"
    UNPROTECT = "unprotect"
    POISON = "poison"
    WAKE = "wake"
    MOVE = "move"


@final
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
#: what a fault handler returns (or its awaitable does): the page(s) as a bytes-like
#: object, a :class:`~uffd_aio.Moved`, or None (the fault was resolved explicitly, or
#: gets the default resolution); the data of the op it becomes
FaultResult: TypeAlias = OpData


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


def copy_data(op: Op) -> ReadableBuffer:
    """The data of a COPY."""
    buf = op.buffer
    if buf is None:
        raise TypeError(f"{op.kind.value} op without data: {op!r}")
    return buf


def _fast_op() -> Callable[[Kind, int, int, OpData, bool], Op]:
    """``Op(kind, address, length, data, wp)`` through the slots' setters, without the
    frozen ``__init__`` (``object.__setattr__`` per field): the same object at about
    half the cost, for the op made per fault on the hot path."""
    fields = attrs.fields(Op)
    assert all(a.validator is None and a.converter is None for a in fields)
    s0, s1, s2, s3, s4 = (Op.__dict__[a.name].__set__ for a in fields)  # slot descriptors
    new = object.__new__

    def make(kind: Kind, address: int, length: int, data: OpData, wp: bool) -> Op:
        o = new(Op)
        s0(o, kind); s1(o, address); s2(o, length); s3(o, data); s4(o, wp)  # noqa: E702
        return o

    return make


new_op = _fast_op()


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
                    data = bytes(copy_data(last)) + bytes(memoryview(copy_data(op))[skip:])
                    out[-1] = Op(Kind.COPY, last.address, len(data), data, last.wp)
                else:
                    out[-1] = Op(op.kind, last.address, op.end - last.address, None, last.wp)
                continue
        out.append(op)
    return out


_zeros: dict[int, mmap.mmap] = {}


def zero_source(length: int) -> memoryview:
    """``length`` zero bytes to UFFDIO_COPY from where UFFDIO_ZEROPAGE does not exist
    (hugetlbfs).  A read-only anonymous mapping never written: it costs no memory
    (every page is the kernel's zero page), one per size, kept for the process."""
    buf = _zeros.get(length)
    if buf is None:
        import mmap

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
