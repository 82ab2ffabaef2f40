"""ZeroBackend: every page reads as zeros (``--backend zero``).

Useful as a baseline (the pager's cost without any store) and for memory
that only needs to exist: faults resolve with UFFDIO_ZEROPAGE.
"""

from __future__ import annotations

from uffd_aio.stores.base import BackendError, Buffer


class ZeroBackend:
    """A store of zeros; read-only (there is nowhere to write pages back to)."""

    name = "zero"

    def __init__(self) -> None:
        self.fetches = 0

    async def fetch(self, offset: int, length: int) -> Buffer | None:
        self.fetches += 1
        return None

    async def store(self, offset: int, data: Buffer) -> None:
        raise BackendError("the zero backend is read-only: dirty pages cannot be written back "
                           "(evicting them would lose data)")

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return "ZeroBackend()"
