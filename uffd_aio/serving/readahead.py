"""Read-ahead policies and fault-order record/replay (pure: no kernel, no loop).

Everything here counts in *pages*.  A policy is asked, for each fault that
needs a fetch, how many pages to fetch starting at the faulting page;
:func:`uffd_aio.serving.attach` then clips that window to the region and to
the run of pages that are neither present nor already being fetched.

* :class:`NoReadahead` -- one page per fault.
* :class:`FixedWindow` -- always ``pages`` pages.
* :class:`AdaptiveWindow` -- per-stream sequential detection: a fault at the
  page right after a stream's last window is a *sequential hit* and doubles
  that stream's window (up to ``max_pages``); any other fault starts a new
  stream at ``min_pages`` (random access resets).  Several interleaved
  streams (one per scanning thread) are tracked at once, up to ``streams``.
* :class:`FaultRecorder` / :func:`read_trace` / :func:`write_trace` -- the
  order of first faults, as a file.
* :class:`ReplayPlan` -- the next prefetch batch of a recorded order, skipping
  pages that became present meanwhile.

Trace file format (little-endian): the 8-byte magic ``b"UFFDTRC1"``, a u64
page size, then one u64 *store* page index (store offset // page size) per
recorded page, in first-fault order.  Store indexes (not addresses) make a
trace reusable across runs where the region lands at another address.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable

TRACE_MAGIC = b"UFFDTRC1"
_HEADER = struct.Struct("<8sQ")


@runtime_checkable
class ReadaheadPolicy(Protocol):
    """Decides how many pages a fault fetches."""

    def window(self, page: int) -> int:
        """Pages to fetch starting at ``page`` (>= 1) for a fault at ``page``."""
        ...


class NoReadahead:
    """Fetch only the faulting page."""

    def window(self, page: int) -> int:
        return 1

    def __repr__(self) -> str:
        return "NoReadahead()"


class FixedWindow:
    """Always fetch ``pages`` pages (the faulting one and the ones after it)."""

    def __init__(self, pages: int) -> None:
        if pages < 1:
            raise ValueError(f"read-ahead window must be >= 1 page, not {pages}")
        self.pages = pages

    def window(self, page: int) -> int:
        return self.pages

    def __repr__(self) -> str:
        return f"FixedWindow({self.pages})"


class AdaptiveWindow:
    """Sequential read-ahead: windows grow on sequential hits and reset on random access.

    Each stream remembers the page right after its last window (where the
    next fault of a sequential scan lands) and its window size.  A fault
    there, or inside that last window (it was clipped, or pages were dropped
    since), doubles the window (``growth``), bounded by ``max_pages``; a fault
    anywhere else opens a new stream with ``min_pages``.  At most ``streams``
    streams are kept (least recently used dropped), so memory is bounded and
    several threads scanning different parts each get their own window.
    """

    def __init__(self, min_pages: int = 1, max_pages: int = 64, *, growth: int = 2,
                 streams: int = 32) -> None:
        if not 1 <= min_pages <= max_pages:
            raise ValueError(f"need 1 <= min_pages ({min_pages}) <= max_pages ({max_pages})")
        if growth < 2:
            raise ValueError("growth must be >= 2")
        if streams < 1:
            raise ValueError("streams must be >= 1")
        self.min_pages = min_pages
        self.max_pages = max_pages
        self.growth = growth
        self.max_streams = streams
        # expected next fault page -> window size of that stream
        self._streams: OrderedDict[int, int] = OrderedDict()
        self.hits = 0
        self.resets = 0

    def window(self, page: int) -> int:
        size = self._streams.pop(page, None)
        if size is None:
            # a fault inside a stream's last window also continues it: the window was
            # clipped (pages already present) or some of its pages were dropped since
            for nxt, sz in self._streams.items():
                if nxt - sz < page < nxt:
                    size = sz
                    del self._streams[nxt]
                    break
        if size is None:
            self.resets += 1
            size = self.min_pages
        else:
            self.hits += 1
            size = min(size * self.growth, self.max_pages)
        self._streams[page + size] = size
        while len(self._streams) > self.max_streams:
            self._streams.popitem(last=False)
        return size

    @property
    def streams(self) -> int:
        return len(self._streams)

    def __repr__(self) -> str:
        return f"AdaptiveWindow({self.min_pages}, {self.max_pages}, streams={self.max_streams})"


def policy_from(spec: ReadaheadPolicy | int | str | None) -> ReadaheadPolicy:
    """A policy from an int (fixed window; 0 or 1 = off), None (off), ``"adaptive"``,
    ``"adaptive:MAX"``, ``"fixed:N"``, ``"off"``, or a policy object."""
    if spec is None:
        return NoReadahead()
    if isinstance(spec, bool):
        raise TypeError("read-ahead must be a policy, an int window or a string")
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"read-ahead window must be >= 0 pages, not {spec}")
        return NoReadahead() if spec <= 1 else FixedWindow(spec)
    if isinstance(spec, str):
        name, _, arg = spec.partition(":")
        if name in ("off", "none", "0"):
            return NoReadahead()
        if name == "fixed" and arg:
            return policy_from(int(arg))
        if name == "adaptive":
            return AdaptiveWindow(max_pages=int(arg)) if arg else AdaptiveWindow()
        if name.isdigit():
            return policy_from(int(name))
        raise ValueError(f"unknown read-ahead {spec!r}: expected off, N, fixed:N, adaptive, "
                         "or adaptive:MAX")
    if isinstance(spec, ReadaheadPolicy):
        return spec
    raise TypeError(f"not a read-ahead policy: {spec!r}")


# ---- record ---------------------------------------------------------------


def encode_trace(pages: Iterable[int], page_size: int) -> bytes:
    """A trace file's bytes for ``pages`` (store page indexes in order)."""
    out = bytearray(_HEADER.pack(TRACE_MAGIC, page_size))
    for p in pages:
        out += p.to_bytes(8, "little")
    return bytes(out)


def decode_trace(data: bytes) -> tuple[int, list[int]]:
    """``(page_size, pages)`` from a trace file's bytes; ValueError when malformed."""
    if len(data) < _HEADER.size:
        raise ValueError("trace too short for its header")
    magic, page_size = _HEADER.unpack_from(data)
    if magic != TRACE_MAGIC:
        raise ValueError(f"not a uffd_aio fault trace (magic {magic!r})")
    body = memoryview(data)[_HEADER.size:]
    if len(body) % 8:
        raise ValueError(f"trace body of {len(body)} bytes is not a whole number of u64s")
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"trace page size {page_size} is not a power of two")
    return page_size, list(body.cast("Q")) if len(body) else []


def write_trace(path: str | os.PathLike[str], pages: Iterable[int], page_size: int) -> None:
    """Write a trace atomically (temp file + rename)."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(encode_trace(pages, page_size))
    os.replace(tmp, path)


def read_trace(path: str | os.PathLike[str]) -> tuple[int, list[int]]:
    with open(path, "rb") as f:
        return decode_trace(f.read())


class FaultRecorder:
    """Records the order in which store pages were first fetched on faults.

    ``record(page)`` is called for the faulting page and then for each page
    its read-ahead window brought in (so a replay covers the pages the
    workload needed, not only those that faulted).  Repeats are ignored.
    ``save()`` writes the trace file (``attach`` does it on close).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, page_size: int = 4096
                 ) -> None:
        self.path = path
        self.page_size = page_size
        self.order: list[int] = []
        self._seen: set[int] = set()

    def record(self, page: int) -> None:
        if page not in self._seen:
            self._seen.add(page)
            self.order.append(page)

    def record_range(self, first: int, count: int) -> None:
        for p in range(first, first + count):
            self.record(p)

    def __len__(self) -> int:
        return len(self.order)

    def save(self, path: str | os.PathLike[str] | None = None) -> None:
        target = path if path is not None else self.path
        if target is None:
            raise ValueError("no trace path given")
        write_trace(target, self.order, self.page_size)


# ---- replay ---------------------------------------------------------------


class ReplayPlan:
    """Walks a recorded order and hands out prefetch batches.

    ``next_batch(skip)`` returns ``(first, count)``: the next run of
    consecutive store pages in trace order (at most ``batch`` long) none of
    which ``skip(page)`` reports as present or in flight, or None when the
    trace is exhausted.  Pages outside ``[lo, hi)`` (another region's) are
    ignored.
    """

    def __init__(self, order: Sequence[int], *, batch: int = 16, lo: int = 0,
                 hi: int | None = None) -> None:
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.order = order
        self.batch = batch
        self.lo = lo
        self.hi = hi
        self.pos = 0
        self.skipped = 0

    def _usable(self, page: int, skip: Callable[[int], bool]) -> bool:
        if page < self.lo or (self.hi is not None and page >= self.hi):
            return False
        return not skip(page)

    def next_batch(self, skip: Callable[[int], bool]) -> tuple[int, int] | None:
        order = self.order
        n = len(order)
        while self.pos < n:
            first = order[self.pos]
            self.pos += 1
            if not self._usable(first, skip):
                self.skipped += 1
                continue
            count = 1
            while (count < self.batch and self.pos < n and order[self.pos] == first + count
                   and self._usable(order[self.pos], skip)):
                count += 1
                self.pos += 1
            return first, count
        return None

    @property
    def done(self) -> bool:
        return self.pos >= len(self.order)

    @property
    def remaining(self) -> int:
        return len(self.order) - self.pos
