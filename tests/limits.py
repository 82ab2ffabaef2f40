"""Limits and sizes that follow the machine the suite runs on.

The host runs the suite at full size with the limits written in the tests.  In the VM lane
(QEMU TCG) the guest is several times slower, by an amount that depends on the machine and
on its load: kernel_patches/scripts/guest-pytest.sh times a fixed workload in the guest and
on the host and exports the ratio as ``UFFD_AIO_TIME_FACTOR``; conftest.py scales every
pytest-timeout limit by it and tests scale their own waits with :func:`limit`.
``UFFD_AIO_TEST_SCALE=guest`` makes the heavy tests run at the sizes that :func:`size`
gives: the same code paths and checks, less data.
"""

from __future__ import annotations

import os

TIME_FACTOR = max(1.0, float(os.environ.get("UFFD_AIO_TIME_FACTOR") or 1.0))
IN_GUEST_SCALE = os.environ.get("UFFD_AIO_TEST_SCALE") == "guest"
# Heavy sizes are divided by this in the guest (never below the size's floor).
GUEST_SIZE_DIVISOR = 4


def limit(seconds: float) -> float:
    """A wait written for the host, stretched by the measured speed factor."""
    return seconds * TIME_FACTOR


def timeout(seconds: float) -> float:
    """A per-test pytest-timeout limit on this machine (scaled like every wait in it)."""
    return seconds * TIME_FACTOR


def size(n: int, *, floor: int = 1 << 20, align: int = 1 << 20) -> int:
    """A heavy test's data size: ``n`` on the host, ``n / 4`` (aligned, >= floor) in the guest."""
    if not IN_GUEST_SCALE:
        return n
    return max(floor, (n // GUEST_SIZE_DIVISOR) // align * align)
