"""Page stores (:class:`PageStore`): byte-addressed stores of pages that faults are served from.

They know nothing about userfaultfd; :mod:`uffd_aio.serving` attaches one to a region.
``open_store(spec)`` (alias ``open_backend``) parses the ``--backend`` SPEC of
``uffd-aio serve``:

* ``zero``                          every page reads as zeros
* ``file:PATH``                     a snapshot file, read with io_uring
* ``compressed:``                   in-memory zstd-compressed pages
* ``redis://host:port/db?prefix=P`` remote memory in Redis (``redis+cluster://`` for a cluster)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uffd_aio.stores import base
from uffd_aio.stores.base import BackendError, Buffer, PageStore

__all__ = ["BackendError", "Buffer", "PageStore", "open_backend", "open_store"]

if TYPE_CHECKING:
    from uffd_aio.stores.base import Backend as Backend  # deprecated: PageStore
else:
    def __getattr__(name: str) -> object:
        return base.deprecated_alias(__name__, name)


async def open_store(spec: str) -> PageStore:
    """Open the store a SPEC string names (see the module docstring)."""
    scheme, sep, rest = spec.partition(":")
    if spec == "zero":
        from uffd_aio.stores.zero import ZeroBackend
        return ZeroBackend()
    if scheme == "file" and sep:
        from uffd_aio.stores.file import FileBackend
        return await FileBackend.open(rest)
    if scheme == "compressed" and sep:
        from uffd_aio.stores.compressed import CompressedBackend
        return CompressedBackend.from_spec(rest)
    if scheme in ("redis", "rediss", "redis+cluster"):
        from uffd_aio.stores.remote import RedisBackend
        return await RedisBackend.open(spec)
    raise ValueError(
        f"unknown backend {spec!r}: expected zero, file:PATH, compressed:, "
        "or redis://host:port/db?prefix=P")


#: the name of the ``--backend`` option's parser before the stores had a package of their own
open_backend = open_store
