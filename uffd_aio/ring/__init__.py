"""io_uring on the event loop: :class:`Ring` (one per loop: :meth:`Ring.shared`).

The C under it (liburing calls, the uffd ioctls, the native engine) and the thin
typed wrappers are the kernel binding, :mod:`uffd_aio.binding`."""

from uffd_aio.ring.ring import Callback, Ring

__all__ = ["Callback", "Ring"]
