"""Userfaultfd ABI constants as Python flags (pure: no kernel, no loop).

The numbers are the kernel's uapi (include/uapi/linux/userfaultfd.h, 6.12),
plus the bits our kernel series adds from bit 17 up (kernel_patches/uapi.md).
"""

from __future__ import annotations

import enum


class Mode(enum.IntFlag):
    """Registration modes (UFFDIO_REGISTER_MODE_*)."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class Feature(enum.IntFlag):
    """UFFD_FEATURE_* bits negotiated with UFFDIO_API."""

    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16
    # uffd_aio kernel series (kernel_patches/uapi.md); absent on stock kernels
    POLL = 1 << 17
    WRITE = 1 << 18


#: features the patched kernel adds; used by ``doctor`` and backend selection
PATCHED_FEATURES = Feature.POLL | Feature.WRITE

#: what a Pager asks for by default when the kernel has it (never required)
DEFAULT_FEATURES = (
    Feature.EVENT_FORK
    | Feature.EVENT_REMAP
    | Feature.EVENT_REMOVE
    | Feature.EVENT_UNMAP
    | Feature.MISSING_SHMEM
    | Feature.MISSING_HUGETLBFS
    | Feature.MINOR_SHMEM
    | Feature.MINOR_HUGETLBFS
    | Feature.PAGEFAULT_FLAG_WP
    | Feature.WP_HUGETLBFS_SHMEM
    | Feature.THREAD_ID
    | Feature.POISON
    | Feature.MOVE
)


class Ioctl(enum.IntFlag):
    """Bits of the ``ioctls`` masks returned by UFFDIO_API / UFFDIO_REGISTER (1 << _UFFDIO_*)."""

    REGISTER = 1 << 0x00
    UNREGISTER = 1 << 0x01
    WAKE = 1 << 0x02
    COPY = 1 << 0x03
    ZEROPAGE = 1 << 0x04
    MOVE = 1 << 0x05
    WRITEPROTECT = 1 << 0x06
    CONTINUE = 1 << 0x07
    POISON = 1 << 0x08
    API = 1 << 0x3F


# resolve-ioctl mode bits
COPY_MODE_DONTWAKE = 1 << 0
COPY_MODE_WP = 1 << 1
ZEROPAGE_MODE_DONTWAKE = 1 << 0
WRITEPROTECT_MODE_WP = 1 << 0
WRITEPROTECT_MODE_DONTWAKE = 1 << 1
CONTINUE_MODE_DONTWAKE = 1 << 0
CONTINUE_MODE_WP = 1 << 1
POISON_MODE_DONTWAKE = 1 << 0
MOVE_MODE_DONTWAKE = 1 << 0
MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1

# userfaultfd(2) / USERFAULTFD_IOC_NEW flags
UFFD_USER_MODE_ONLY = 1


def feature_names(features: int) -> list[str]:
    """Names of the set bits, unknown bits as ``bit<N>``."""
    names: list[str] = []
    for bit in range(64):
        if features & (1 << bit):
            name = Feature._value2member_map_.get(1 << bit)
            names.append(name.name if name is not None and name.name else f"bit{bit}")
    return names
