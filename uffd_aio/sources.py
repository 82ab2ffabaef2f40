"""What a region can be served from natively (``region.serve_from``): the argument types and
:data:`ZERO`.  Pure descriptions, no kernel: region.py names them and native.py turns them
into the engine's sources."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeAlias

from uffd_aio.serving.readahead import AdaptiveWindow, FixedWindow, NoReadahead

if TYPE_CHECKING:
    from _typeshed import HasFileno, ReadableBuffer, StrPath

__all__ = ["ZERO", "NativeSourceArg", "Readahead", "TouchRecorder", "ZeroSource"]


class ZeroSource:
    """The zero source: ``region.serve_from(uffd_aio.ZERO)``."""

    _instance: ZeroSource | None = None

    def __new__(cls) -> ZeroSource:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "uffd_aio.ZERO"


ZERO: Final = ZeroSource()


Readahead = int | tuple[int, int] | FixedWindow | AdaptiveWindow | NoReadahead | None
#: what ``region.serve_from`` serves: a buffer, a path or open file, or :data:`ZERO`
NativeSourceArg: TypeAlias = "ReadableBuffer | StrPath | HasFileno | ZeroSource"
#: ``serve_from(record=...)``: called as ``record(page, pages, is_write)`` for each demand
#: fault the engine serves on the region (page index in the region, pages placed from it)
TouchRecorder: TypeAlias = Callable[[int, int, bool], object]
