"""uffd_aio: an asyncio-native userfaultfd pager over io_uring.

GIL rule: a Python thread that touches registered memory while holding the
GIL deadlocks an in-process pager (the loop needs the GIL to serve it).
Touch memory from native code that releases the GIL (``uffd_aio.testing``,
C extensions) or from another process.  See docs/gil.md.
"""

from uffd_aio.errors import (
    BadHandlerResult,
    FeatureUnavailable,
    HandlerError,
    MissingExtra,
    MoveError,
    PagerClosed,
    ResolveError,
    UffdError,
)
from uffd_aio.events import EventHandler, Fork, Remap, Remove, Unmap
from uffd_aio.modes import Feature, Mode
from uffd_aio.ops import FaultResult
from uffd_aio.pager import HandlerTimeout, Pager, PagerFailed
from uffd_aio.region import FaultHandler, PageFault, Region
from uffd_aio.resolve import Moved
from uffd_aio.ring import Ring
from uffd_aio.sources import ZERO
from uffd_aio.stats import PagerStats
from uffd_aio.uffd import Userfaultfd, available_features

__version__ = "0.1.0"

__all__ = [
    "ZERO",
    "BadHandlerResult",
    "EventHandler",
    "FaultHandler",
    "FaultResult",
    "Feature",
    "FeatureUnavailable",
    "Fork",
    "HandlerError",
    "HandlerTimeout",
    "MissingExtra",
    "Mode",
    "MoveError",
    "Moved",
    "PageFault",
    "Pager",
    "PagerClosed",
    "PagerFailed",
    "PagerStats",
    "Region",
    "Remap",
    "Remove",
    "ResolveError",
    "Ring",
    "UffdError",
    "Unmap",
    "Userfaultfd",
    "available_features",
]
