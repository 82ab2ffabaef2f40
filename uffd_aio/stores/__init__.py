"""Ready-made backends (page stores: :class:`PageStore`) and the glue that serves regions
from them.

``open_backend(spec)`` parses the ``--backend`` SPEC of ``uffd-aio serve``:

* ``zero``                          every page reads as zeros
* ``file:PATH``                     a snapshot file, read with io_uring
* ``compressed:``                   in-memory zstd-compressed pages
* ``redis://host:port/db?prefix=P`` remote memory in Redis (``redis+cluster://`` for a cluster)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uffd_aio.handlers import base
from uffd_aio.handlers.attach import Attachment, AttachStats, attach
from uffd_aio.handlers.base import BackendError, PageStore

__all__ = ["AttachStats", "Attachment", "BackendError", "PageStore", "attach", "open_backend"]

if TYPE_CHECKING:
    from uffd_aio.handlers.base import Backend as Backend  # deprecated: PageStore
else:
    def __getattr__(name: str) -> object:
        return base.deprecated_alias(__name__, name)


async def open_backend(spec: str) -> PageStore:
    """Open the backend a SPEC string names (see the module docstring)."""
    scheme, sep, rest = spec.partition(":")
    if spec == "zero":
        from uffd_aio.handlers.zero import ZeroBackend
        return ZeroBackend()
    if scheme == "file" and sep:
        from uffd_aio.handlers.file import FileBackend
        return await FileBackend.open(rest)
    if scheme == "compressed" and sep:
        from uffd_aio.handlers.compressed import CompressedBackend
        return CompressedBackend.from_spec(rest)
    if scheme in ("redis", "rediss", "redis+cluster"):
        from uffd_aio.handlers.remote import RedisBackend
        return await RedisBackend.open(spec)
    raise ValueError(
        f"unknown backend {spec!r}: expected zero, file:PATH, compressed:, "
        "or redis://host:port/db?prefix=P")
