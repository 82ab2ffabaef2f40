"""The backend contract: a byte-addressed store of pages that fault handlers read from.

Backends know nothing about userfaultfd; :mod:`uffd_aio.handlers.attach`
turns one into a region's fault handler (read-ahead, dirty tracking).
"""

from __future__ import annotations

from typing import Protocol, TypeAlias, runtime_checkable

#: what backends return and accept (Python 3.11 has no collections.abc.Buffer)
Buffer: TypeAlias = bytes | bytearray | memoryview


class BackendError(Exception):
    """A backend could not serve a request (the pager's error policy then applies)."""


@runtime_checkable
class Backend(Protocol):
    """A store addressed by byte offset.  All offsets and lengths are page multiples."""

    #: short description for logs and ``uffd-aio serve`` output
    name: str

    async def fetch(self, offset: int, length: int) -> Buffer | None:
        """Exactly ``length`` bytes at ``offset``, or None when the whole range is zeros.

        Ranges past the end of the store read as zeros (a VM's memory is
        larger than the part that was ever written).
        """
        ...

    async def store(self, offset: int, data: Buffer) -> None:
        """Write back ``data`` at ``offset`` (dirty pages on eviction).

        Read-only backends raise :class:`BackendError`.
        """
        ...

    async def aclose(self) -> None:
        """Release connections, files and buffers."""
        ...
