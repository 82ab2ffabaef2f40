"""CompressedBackend: an in-memory store of zstd-compressed pages (``compressed:`` SPEC).

Each page is compressed on its own (like zswap/zram), so a fault decompresses
only the pages it fetches; all-zero pages are not stored at all and read
back as zeros.  Writes (dirty-page write-back) replace pages.  Everything
runs on the loop thread: a 4 KiB page decompresses in a few microseconds, so
a fetch never suspends (the handler resolves without a Task).

SPEC: ``compressed:`` then comma-separated options, all optional:
``level=N`` (zstd level, default 3), ``file=PATH`` (load a file at offset 0),
``page_size=N``.  A bare path (``compressed:/snap/mem``) means ``file=PATH``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import attrs

from uffd_aio.errors import MissingExtra
from uffd_aio.stores.base import BackendError, Buffer

try:
    import zstandard
except ImportError as _exc:  # zstandard is the optional extra [zstd]
    raise MissingExtra("zstandard", "zstd", "the compressed backend") from _exc

__all__ = ["CompressedBackend", "CompressedStats"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


@attrs.frozen
class CompressedStats:
    #: pages held (all-zero pages are not held)
    pages: int
    #: bytes those pages take uncompressed / compressed
    raw_bytes: int
    compressed_bytes: int
    fetches: int
    stores: int

    @property
    def ratio(self) -> float:
        """Uncompressed / compressed size (1.0 when empty)."""
        return self.raw_bytes / self.compressed_bytes if self.compressed_bytes else 1.0


class CompressedBackend:
    """Pages compressed with zstd, held in a dict keyed by page index."""

    #: fetches never suspend: run the fault handler eagerly (no Task per fault)
    eager = True

    def __init__(self, *, level: int = 3, page_size: int = _PAGE) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two")
        self.page_size = page_size
        self.level = level
        self.name = f"compressed(zstd-{level})"
        self._pages: dict[int, bytes] = {}
        self._cctx = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                              write_checksum=False)
        self._dctx = zstandard.ZstdDecompressor()
        self._zero = bytes(page_size)
        self._compressed_bytes = 0
        self._fetches = 0
        self._stores = 0

    @classmethod
    def from_spec(cls, rest: str) -> CompressedBackend:
        """Parse what follows ``compressed:`` (see the module docstring)."""
        opts: dict[str, str] = {}
        for part in filter(None, rest.split(",")):
            key, eq, value = part.partition("=")
            if not eq:
                key, value = "file", part
            if key not in ("level", "file", "page_size"):
                raise ValueError(f"compressed backend: unknown option {key!r} "
                                 "(expected level=N, file=PATH, page_size=N)")
            opts[key] = value
        try:
            be = cls(level=int(opts.get("level", 3)),
                     page_size=int(opts.get("page_size", _PAGE)))
        except ValueError as exc:
            raise ValueError(f"compressed backend: {exc}") from None
        if "file" in opts:
            be.load_file(opts["file"])
        return be

    # ---- loading -----------------------------------------------------------

    def load(self, offset: int, data: Buffer) -> None:
        """Put ``data`` at ``offset`` (synchronously; both page multiples)."""
        view = memoryview(data).cast("B")
        ps = self.page_size
        if offset % ps or view.nbytes % ps:
            raise BackendError(f"{self.name}: store of {view.nbytes} bytes at {offset:#x} is "
                               f"not page-aligned ({ps})")
        first = offset // ps
        pages = self._pages
        zero = self._zero
        compress = self._cctx.compress
        for i in range(view.nbytes // ps):
            chunk = view[i * ps:(i + 1) * ps]
            old = pages.pop(first + i, None)
            if old is not None:
                self._compressed_bytes -= len(old)
            if chunk != zero:
                c = compress(chunk)
                pages[first + i] = c
                self._compressed_bytes += len(c)

    def load_file(self, path: str | os.PathLike[str], offset: int = 0,
                  chunk: int = 4 << 20) -> int:
        """Load a file at ``offset`` (zero-padded to a whole page); bytes read."""
        total = 0
        ps = self.page_size
        with open(path, "rb") as f:
            while True:
                block = f.read(chunk)
                if not block:
                    break
                if len(block) % ps:
                    block += bytes(ps - len(block) % ps)
                self.load(offset + total, block)
                total += len(block)
        return total

    # ---- PageStore -----------------------------------------------------------

    async def fetch(self, offset: int, length: int) -> Buffer | None:
        ps = self.page_size
        if offset % ps or length % ps or length <= 0:
            raise BackendError(f"{self.name}: fetch of {length} bytes at {offset:#x} is not "
                               f"page-aligned ({ps})")
        self._fetches += 1
        first = offset // ps
        n = length // ps
        pages = self._pages
        if n == 1:
            c = pages.get(first)
            return None if c is None else self._dctx.decompress(c)
        out: bytearray | None = None
        decompress = self._dctx.decompress
        for i in range(n):
            c = pages.get(first + i)
            if c is None:
                continue
            if out is None:
                out = bytearray(length)
            out[i * ps:(i + 1) * ps] = decompress(c)
        return out

    async def store(self, offset: int, data: Buffer) -> None:
        self._stores += 1
        self.load(offset, data)

    async def aclose(self) -> None:
        self._pages.clear()
        self._compressed_bytes = 0

    # ---- introspection --------------------------------------------------------

    @property
    def stats(self) -> CompressedStats:
        return CompressedStats(pages=len(self._pages), raw_bytes=len(self._pages) * self.page_size,
                               compressed_bytes=self._compressed_bytes, fetches=self._fetches,
                               stores=self._stores)

    def page_indexes(self) -> Iterator[int]:
        return iter(sorted(self._pages))

    def __repr__(self) -> str:
        s = self.stats
        return f"<CompressedBackend level={self.level} pages={s.pages} ratio={s.ratio:.2f}>"
