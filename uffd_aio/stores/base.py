"""The page-store contract: a byte-addressed store of pages that fault handlers read from.

A *backend* (``uffd-aio serve --backend SPEC``, :func:`uffd_aio.stores.open_backend`)
is a :class:`PageStore`.  Stores know nothing about userfaultfd;
:mod:`uffd_aio.serving.attach` turns one into a region's fault handler
(read-ahead, dirty tracking).  Not to be confused with the *resolvers* of
:mod:`uffd_aio.resolve`, which turn a handler's result into mapped memory.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Protocol, TypeAlias, runtime_checkable

#: what stores return and accept (Python 3.11 has no collections.abc.Buffer)
Buffer: TypeAlias = bytes | bytearray | memoryview


class BackendError(Exception):
    """A backend could not serve a request (the pager's error policy then applies)."""


@runtime_checkable
class PageStore(Protocol):
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

        Read-only stores raise :class:`BackendError`.
        """
        ...

    async def aclose(self) -> None:
        """Release connections, files and buffers."""
        ...


if TYPE_CHECKING:
    Backend = PageStore  # deprecated alias (the old name)
else:
    def __getattr__(name: str) -> object:
        return deprecated_alias(__name__, name)


#: names that were renamed, for :func:`deprecated_alias`
RENAMED = {"Backend": "PageStore"}


def deprecated_alias(module: str, name: str) -> object:
    """The module ``__getattr__`` of the deprecated ``Backend`` name (a DeprecationWarning)."""
    new = RENAMED.get(name)
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} is deprecated: use {new}", DeprecationWarning, stacklevel=3)
    return globals()[new]
