"""io_uring layer: the cffi binding (``_native``), its thin wrapper (``_lowlevel``) and the
asyncio engine (:class:`Ring`)."""

from uffd_aio.ring.ring import Callback, Ring

__all__ = ["Callback", "Ring"]
