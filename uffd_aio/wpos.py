"""Write position of the patched kernel's uffd write interface (pure: no kernel, no loop).

On a kernel with ``UFFD_FEATURE_WRITE`` (kernel_patches/uapi.md, section 3) a
resolution is a positional write to the writer fd from ``UFFDIO_WRITE_FD``::

    pwrite(wfd, buf, len, pos)     pos = dst | op | flags

``dst`` is the page-aligned destination, the low 12 bits carry the operation
(bits 1..3), ``DONTWAKE`` (bit 0) and ``MODE_WP`` (bit 4); bits 5..11 must
be 0.  The numbers are those of the series' ``include/uapi/linux/userfaultfd.h``
(``UFFDIO_WRITE_*``); the kernel rejects the same combinations that
:func:`encode` rejects, with ``EINVAL``.
"""

from __future__ import annotations

import enum

import attrs

#: UFFDIO_WRITE_DONTWAKE: do not wake the resolved range
DONTWAKE = 1 << 0
#: UFFDIO_WRITE_OP_SHIFT / UFFDIO_WRITE_OP_MASK: the operation, bits 1..3
OP_SHIFT = 1
OP_MASK = 7 << OP_SHIFT
#: UFFDIO_WRITE_MODE_WP: map write-protected (COPY and CONTINUE only)
MODE_WP = 1 << 4
#: UFFDIO_WRITE_POS_MASK: every low bit that is not part of ``dst``
POS_MASK = 0xFFF
#: bits 5..11: reserved, must be 0
RESERVED_MASK = POS_MASK & ~(DONTWAKE | OP_MASK | MODE_WP)
#: op value 7 (0xe) is reserved
_RESERVED_OP = 7 << OP_SHIFT
#: a write position is a (signed) loff_t: ``dst`` must stay below 2**63
_POS_LIMIT = 1 << 63


class WriteOp(enum.IntEnum):
    """UFFDIO_WRITE_OP_* (already shifted into place: the value is the pos bits)."""

    COPY = 0 << OP_SHIFT
    ZEROPAGE = 1 << OP_SHIFT
    CONTINUE = 2 << OP_SHIFT
    WP = 3 << OP_SHIFT
    UNPROTECT = 4 << OP_SHIFT
    WAKE = 5 << OP_SHIFT
    POISON = 6 << OP_SHIFT

    @property
    def reads_buffer(self) -> bool:
        """Only COPY reads the write buffer; the other ops take ``len`` as the range."""
        return self is WriteOp.COPY

    @property
    def all_or_nothing(self) -> bool:
        """WP, UNPROTECT and WAKE never return a short count."""
        return self in (WriteOp.WP, WriteOp.UNPROTECT, WriteOp.WAKE)


#: ops that accept MODE_WP
MODE_WP_OPS = frozenset({WriteOp.COPY, WriteOp.CONTINUE})


class WritePosError(ValueError):
    """A write position the kernel would reject with EINVAL."""


@attrs.frozen(slots=True)
class WritePos:
    """A decoded write position."""

    dst: int
    op: WriteOp
    dontwake: bool = False
    mode_wp: bool = False

    def encode(self) -> int:
        return encode(self.dst, self.op, dontwake=self.dontwake, mode_wp=self.mode_wp)


def encode(dst: int, op: WriteOp, *, dontwake: bool = False, mode_wp: bool = False,
           page_size: int = 4096) -> int:
    """``pos`` for a write of ``op`` at ``dst``; raises :class:`WritePosError` like EINVAL.

    ``page_size`` (a power of two >= 4096) is the alignment ``dst`` needs: the
    base page size, or the huge page size for hugetlbfs ranges.
    """
    if page_size < 4096 or page_size & (page_size - 1):
        raise WritePosError(f"page size {page_size} is not a power of two >= 4096")
    if dst < 0 or dst >= _POS_LIMIT:
        raise WritePosError(f"destination {dst:#x} is outside 0..2**63")
    if dst & (page_size - 1):
        raise WritePosError(f"destination {dst:#x} is not aligned to {page_size:#x}")
    op = WriteOp(op)
    if mode_wp and op not in MODE_WP_OPS:
        raise WritePosError(f"MODE_WP is only valid with COPY and CONTINUE, not {op.name}")
    if dontwake and op is WriteOp.WAKE:
        raise WritePosError("DONTWAKE is not valid with WAKE")
    return dst | int(op) | (DONTWAKE if dontwake else 0) | (MODE_WP if mode_wp else 0)


def decode(pos: int) -> WritePos:
    """Split ``pos`` into its parts; raises :class:`WritePosError` for what the kernel rejects."""
    if pos < 0 or pos >= _POS_LIMIT:
        raise WritePosError(f"position {pos:#x} is outside 0..2**63 (a negative loff_t)")
    low = pos & POS_MASK
    if low & RESERVED_MASK:
        raise WritePosError(f"reserved bits {low & RESERVED_MASK:#x} set in {pos:#x}")
    opbits = low & OP_MASK
    if opbits == _RESERVED_OP:
        raise WritePosError(f"reserved op value 7 in {pos:#x}")
    op = WriteOp(opbits)
    dontwake = bool(low & DONTWAKE)
    mode_wp = bool(low & MODE_WP)
    if mode_wp and op not in MODE_WP_OPS:
        raise WritePosError(f"MODE_WP is only valid with COPY and CONTINUE, not {op.name}")
    if dontwake and op is WriteOp.WAKE:
        raise WritePosError("DONTWAKE is not valid with WAKE")
    return WritePos(pos & ~POS_MASK, op, dontwake, mode_wp)
