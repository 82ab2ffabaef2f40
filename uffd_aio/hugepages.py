"""hugetlbfs page sizes: what the kernel offers, what a mapping really uses.

A region's ``page_size`` must be the page size the kernel uses for that memory:
userfaultfd resolves hugetlbfs memory only in whole huge pages (a 4 KiB UFFDIO_COPY
into a 2 MiB mapping is ``EINVAL``), and a 2 MiB copy into 4 KiB memory fills 512
pages when one was asked for.  The truth is ``KernelPageSize`` in ``/proc/PID/smaps``
(for our own memory and, as root or the same user, for a peer's after a handoff).
"""

from __future__ import annotations

import os
import re

from uffd_aio.errors import UffdError

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
HUGE_2M = 2 << 20
MAP_HUGETLB = 0x40000
MAP_HUGE_SHIFT = 26
MFD_HUGETLB = 0x0004
MFD_HUGE_SHIFT = 26
_SYSFS = "/sys/kernel/mm/hugepages"
_VMA = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) ")


class PageSizeMismatch(UffdError, ValueError):
    """A range's declared page size is not the one the kernel uses for that memory."""


class HugePagesUnavailable(UffdError, OSError):
    """No huge pages of that size can be had (none reserved, or the size is unsupported)."""


def supported_sizes() -> list[int]:
    """Huge page sizes this kernel offers (bytes), smallest first."""
    try:
        names = os.listdir(_SYSFS)
    except OSError:
        return []
    return sorted(int(n.removeprefix("hugepages-").removesuffix("kB")) << 10 for n in names
                  if n.startswith("hugepages-") and n.endswith("kB"))


def pool(size: int) -> tuple[int, int]:
    """(reserved, free) huge pages of ``size`` bytes (``nr_hugepages``, ``free_hugepages``)."""
    d = f"{_SYSFS}/hugepages-{size >> 10}kB"
    try:
        with open(f"{d}/nr_hugepages") as f:
            total = int(f.read())
        with open(f"{d}/free_hugepages") as f:
            free = int(f.read())
    except OSError:
        return 0, 0
    return total, free


def check_size(page_size: int) -> None:
    """ValueError unless ``page_size`` is the base page size or a huge size the kernel has."""
    if page_size == PAGE_SIZE:
        return
    sizes = supported_sizes()
    if page_size not in sizes:
        raise ValueError(f"page_size {page_size} is neither the base page size {PAGE_SIZE} "
                         f"nor a huge page size of this kernel "
                         f"({', '.join(map(str, sizes)) or 'none: no hugetlbfs'})")


def map_flags(page_size: int) -> int:
    """mmap flags selecting hugetlbfs pages of ``page_size`` (0 for base pages)."""
    if page_size == PAGE_SIZE:
        return 0
    return MAP_HUGETLB | ((page_size.bit_length() - 1) << MAP_HUGE_SHIFT)


def memfd_flags(page_size: int) -> int:
    if page_size == PAGE_SIZE:
        return 0
    return MFD_HUGETLB | ((page_size.bit_length() - 1) << MFD_HUGE_SHIFT)


def unavailable(page_size: int, length: int, exc: OSError) -> HugePagesUnavailable:
    """The clear error for a failed hugetlbfs mmap/ftruncate (usually ENOMEM: no pool)."""
    total, free = pool(page_size)
    need = -(-length // page_size)
    return HugePagesUnavailable(
        exc.errno or 0,
        f"cannot map {length:#x} bytes of {page_size >> 10} KiB huge pages ({exc.strerror}): "
        f"{need} needed, {free} free of {total} reserved; reserve more with "
        f"'echo N > {_SYSFS}/hugepages-{page_size >> 10}kB/nr_hugepages' "
        f"(or /proc/sys/vm/nr_hugepages for the default size)")


def page_sizes(address: int, length: int, pid: int | str = "self") -> dict[int, int] | None:
    """KernelPageSize of every mapping overlapping ``[address, address+length)`` of ``pid``:
    ``{vma_start: page_size}``; None when smaps cannot be read (process gone, no
    permission).  A hole in the range has no entry."""
    end = address + length
    out: dict[int, int] = {}
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            cur: int | None = None
            for line in f:
                m = _VMA.match(line)
                if m:
                    lo, hi = int(m[1], 16), int(m[2], 16)
                    cur = lo if lo < end and address < hi else None
                elif cur is not None and line.startswith(b"KernelPageSize:"):
                    out[cur] = int(line.split()[1]) << 10
                    cur = None
    except OSError:
        return None
    return out


def check_range(address: int, length: int, page_size: int, *, pid: int | str = "self",
                what: str = "range") -> int | None:
    """The range's real page size, after checking it against ``page_size`` (0: detect).

    Raises :class:`PageSizeMismatch` when the memory uses another page size (or
    mixes sizes); returns None when it cannot be told (smaps unreadable, nothing
    mapped there).
    """
    sizes = page_sizes(address, length, pid)
    if not sizes:
        return None
    real = set(sizes.values())
    if len(real) > 1:
        raise PageSizeMismatch(
            f"{what} {address:#x}+{length:#x} spans mappings with different page sizes "
            f"({', '.join(f'{s >> 10} KiB' for s in sorted(real))}): register them separately")
    (ps,) = real
    if page_size and ps != page_size:
        where = "" if pid == "self" else f" of pid {pid}"
        raise PageSizeMismatch(
            f"{what} {address:#x}+{length:#x}{where} declares page_size {page_size} but the "
            f"kernel maps it with {ps >> 10} KiB pages (KernelPageSize in /proc/{pid}/smaps)"
            + (": hugetlbfs memory is resolved in whole huge pages" if ps > PAGE_SIZE else ""))
    return ps
