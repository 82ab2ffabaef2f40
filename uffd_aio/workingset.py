"""Working sets: record, store, merge and plan the replay of the pages a restore touches.

Pure: no kernel, no loop (a file is read or written only by the functions that say so).
Everything counts in *store pages* (store offset // page size), like the order traces of
:mod:`uffd_aio.serving.readahead`, so a set is reusable when the memory lands at other
addresses.

Restores of one snapshot touch a set of pages that repeats from run to run while the order
does not, so a working set is first of all a *set* (a bitmap over the snapshot's pages),
with the first-touch order as a hint for what to install first and the kind of each page's
first access (read or write).

File format, version 1 (little-endian)::

    header (64 bytes)
      8s   magic b"UFFDWSET"
      u32  version (1)
      u32  flags (0)
      u64  page_size
      u64  store_pages       pages in the snapshot (bits of the bitmap)
      u64  count             pages in the set
      u32  runs              recordings merged into this set (1 for a recording)
      u32  reserved (0)
      16s  snapshot_id       fingerprint of the snapshot (all zeros: unknown, not checked)
    bitmap       ceil(store_pages / 8) bytes, bit p (byte p // 8, bit p % 8) = page p is in
    order        count x u32, the set's pages in first-touch order (merged: mean rank)
    written      ceil(count / 8) bytes, bit i = the first access to order[i] was a write
    crc32        u32 of everything before it

:func:`decode` checks every field (magic, version, sizes, the bitmap against the order,
the checksum) and raises :class:`WorkingSetError` (a ``ValueError``) naming what is wrong;
:meth:`WorkingSet.check` raises :class:`WorkingSetMismatch` when a set belongs to another
snapshot (page size, size or identity).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

MAGIC = b"UFFDWSET"
VERSION = 1
ID_BYTES = 16
NO_ID = bytes(ID_BYTES)
_HEADER = struct.Struct("<8sIIQQQII16s")
_CRC = struct.Struct("<I")
_MAX_PAGES = 1 << 32  # order entries are u32

Phase = Literal["set", "fill"]

__all__ = ["MAGIC", "NO_ID", "VERSION", "InstallPlan", "WorkingSet", "WorkingSetError",
           "WorkingSetMismatch", "WorkingSetRecorder", "decode", "fingerprint_file",
           "id_from_text", "is_working_set", "jaccard", "merge", "read", "write"]


class WorkingSetError(ValueError):
    """A working-set file is malformed (truncated, corrupt, not one)."""


class WorkingSetMismatch(WorkingSetError):
    """A working set recorded for another snapshot (page size, size or identity)."""


@dataclass(frozen=True)
class WorkingSet:
    """The pages of one snapshot a restore touched, in first-touch order.

    ``order`` holds distinct store pages < ``store_pages``; ``written`` the pages of
    ``order`` whose first access was a write; ``runs`` how many recordings were merged."""

    page_size: int
    store_pages: int
    order: tuple[int, ...]
    written: frozenset[int] = frozenset()
    snapshot_id: bytes = NO_ID
    runs: int = 1
    _pages: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ps = self.page_size
        if ps <= 0 or ps & (ps - 1):
            raise WorkingSetError(f"page size {ps} is not a power of two")
        if not 0 <= self.store_pages < _MAX_PAGES:
            raise WorkingSetError(f"{self.store_pages} store pages: at most {_MAX_PAGES - 1}")
        if len(self.snapshot_id) != ID_BYTES:
            raise WorkingSetError(f"snapshot id must be {ID_BYTES} bytes, not "
                                  f"{len(self.snapshot_id)}")
        if self.runs < 1:
            raise WorkingSetError(f"runs must be >= 1, not {self.runs}")
        pages = frozenset(self.order)
        if len(pages) != len(self.order):
            raise WorkingSetError("the order lists a page twice")
        if self.order and not 0 <= min(self.order) <= max(self.order) < self.store_pages:
            raise WorkingSetError(f"a page of the order is outside the snapshot's "
                                  f"{self.store_pages} pages")
        if not self.written <= pages:
            raise WorkingSetError("written pages must be in the set")
        object.__setattr__(self, "_pages", pages)

    def __len__(self) -> int:
        return len(self.order)

    def __contains__(self, page: object) -> bool:
        return page in self._pages

    @property
    def pages(self) -> frozenset[int]:
        return self._pages

    @property
    def nbytes(self) -> int:
        return len(self.order) * self.page_size

    def check(self, *, page_size: int, store_pages: int | None = None,
              snapshot_id: bytes | None = None, what: str = "working set") -> None:
        """Raise :class:`WorkingSetMismatch` unless this set fits that snapshot (``None``
        and an all-zero id on either side are not checked)."""
        if page_size != self.page_size:
            raise WorkingSetMismatch(f"{what} has page size {self.page_size}, the memory "
                                     f"{page_size}")
        if store_pages is not None and store_pages != self.store_pages:
            raise WorkingSetMismatch(
                f"{what} was recorded for a snapshot of {self.store_pages} pages "
                f"({self.store_pages * self.page_size} bytes); this one has {store_pages} "
                f"({store_pages * self.page_size} bytes)")
        if snapshot_id is not None and snapshot_id != NO_ID and self.snapshot_id != NO_ID \
                and snapshot_id != self.snapshot_id:
            raise WorkingSetMismatch(
                f"{what} was recorded for another snapshot (id {self.snapshot_id.hex()}, "
                f"this snapshot's is {snapshot_id.hex()})")

    def encode(self) -> bytes:
        n = len(self.order)
        out = bytearray(_HEADER.pack(MAGIC, VERSION, 0, self.page_size, self.store_pages, n,
                                     self.runs, 0, self.snapshot_id))
        bitmap = bytearray((self.store_pages + 7) // 8)
        for p in self.order:
            bitmap[p >> 3] |= 1 << (p & 7)
        out += bitmap
        out += struct.pack(f"<{n}I", *self.order)
        wbits = bytearray((n + 7) // 8)
        written = self.written
        for i, p in enumerate(self.order):
            if p in written:
                wbits[i >> 3] |= 1 << (i & 7)
        out += wbits
        out += _CRC.pack(zlib.crc32(out))
        return bytes(out)


def is_working_set(data: bytes) -> bool:
    """The bytes start with the working-set magic (tell it from an order trace)."""
    return data[:len(MAGIC)] == MAGIC


def decode(data: bytes, *, what: str = "working set") -> WorkingSet:
    """A :class:`WorkingSet` from a file's bytes; :class:`WorkingSetError` when malformed."""
    if len(data) < _HEADER.size:
        raise WorkingSetError(f"{what}: {len(data)} bytes, too short for the "
                              f"{_HEADER.size}-byte header")
    magic, version, flags, ps, store_pages, count, runs, _res, sid = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WorkingSetError(f"{what}: not a uffd_aio working set (magic {magic!r})")
    if version != VERSION:
        raise WorkingSetError(f"{what}: version {version}, this uffd_aio reads {VERSION}")
    if flags:
        raise WorkingSetError(f"{what}: unknown flags {flags:#x}")
    if count > store_pages:
        raise WorkingSetError(f"{what}: {count} pages in a set of {store_pages}")
    bm_len = (store_pages + 7) // 8
    want = _HEADER.size + bm_len + 4 * count + (count + 7) // 8 + _CRC.size
    if len(data) != want:
        raise WorkingSetError(f"{what}: {len(data)} bytes, the header says {want} "
                              f"({'truncated' if len(data) < want else 'trailing data'})")
    (crc,) = _CRC.unpack_from(data, want - _CRC.size)
    if zlib.crc32(memoryview(data)[:want - _CRC.size]) != crc:
        raise WorkingSetError(f"{what}: checksum mismatch (corrupt file)")
    off = _HEADER.size
    bitmap = data[off:off + bm_len]
    off += bm_len
    order = struct.unpack_from(f"<{count}I", data, off)
    off += 4 * count
    wbits = data[off:off + (count + 7) // 8]
    written = frozenset(p for i, p in enumerate(order) if wbits[i >> 3] >> (i & 7) & 1)
    try:
        ws = WorkingSet(ps, store_pages, order, written, sid, runs)
    except WorkingSetError as exc:
        raise WorkingSetError(f"{what}: {exc}") from None
    if sum(bin(b).count("1") for b in bitmap) != count or \
            any(not bitmap[p >> 3] >> (p & 7) & 1 for p in order):
        raise WorkingSetError(f"{what}: the bitmap does not match the order")
    return ws


def read(path: str | os.PathLike[str]) -> WorkingSet:
    with open(path, "rb") as f:
        return decode(f.read(), what=f"working set {os.fspath(path)!r}")


def write(path: str | os.PathLike[str], ws: WorkingSet) -> None:
    """Write atomically (temp file + rename): readers never see half a file."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(ws.encode())
    os.replace(tmp, path)


def id_from_text(text: str) -> bytes:
    """A snapshot id from a caller-given name (e.g. a snapshot's version string)."""
    return hashlib.blake2b(text.encode(), digest_size=ID_BYTES).digest()


def fingerprint_file(path: str | os.PathLike[str], *, page_size: int = 4096,
                     samples: int = 16) -> bytes:
    """A cheap content fingerprint of a snapshot file: its size and ``samples`` pages
    spread evenly over it (first and last included), hashed.  Catches another snapshot,
    not a changed byte between samples."""
    h = hashlib.blake2b(digest_size=ID_BYTES)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        npages = (size + page_size - 1) // page_size
        if npages:
            picks = sorted({(npages - 1) * i // max(1, samples - 1) for i in range(samples)})
            for p in picks:
                f.seek(p * page_size)
                h.update(f.read(page_size))
    return h.digest()


def jaccard(a: WorkingSet, b: WorkingSet) -> float:
    """|a & b| / |a | b| of two sets' pages (1.0 for two empty sets)."""
    union = len(a.pages | b.pages)
    return len(a.pages & b.pages) / union if union else 1.0


# ---- record -----------------------------------------------------------------------------


class WorkingSetRecorder:
    """Records first touches (page, read or write), bounded by pages or seconds.

    ``record(page, write)`` is called for each fault (the faulting page, not read-ahead:
    pages a window brought in were not touched); repeats are ignored.  Once
    ``max_pages`` pages are recorded, or ``max_seconds`` after the first one, recording
    stops (``full``) and ``record`` returns False."""

    def __init__(self, *, page_size: int, store_pages: int, snapshot_id: bytes = NO_ID,
                 max_pages: int | None = None, max_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_pages is not None and max_pages < 1:
            raise ValueError("max_pages must be >= 1")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError("max_seconds must be > 0")
        self.page_size = page_size
        self.store_pages = store_pages
        self.snapshot_id = snapshot_id
        self.max_pages = max_pages
        self.max_seconds = max_seconds
        self._clock = clock
        self._t0: float | None = None
        self.order: list[int] = []
        self.written: set[int] = set()
        self._seen: set[int] = set()
        self.full = False
        self.ignored = 0  # pages outside the snapshot

    def __len__(self) -> int:
        return len(self.order)

    def record(self, page: int, write: bool = False) -> bool:
        if self.full:
            return False
        if page in self._seen:
            return True
        if not 0 <= page < self.store_pages:
            self.ignored += 1
            return True
        now = self._clock()
        if self._t0 is None:
            self._t0 = now
        elif self.max_seconds is not None and now - self._t0 > self.max_seconds:
            self.full = True
            return False
        self._seen.add(page)
        self.order.append(page)
        if write:
            self.written.add(page)
        if self.max_pages is not None and len(self.order) >= self.max_pages:
            self.full = True
        return True

    def result(self) -> WorkingSet:
        return WorkingSet(self.page_size, self.store_pages, tuple(self.order),
                          frozenset(self.written), self.snapshot_id)


# ---- merge ------------------------------------------------------------------------------


def merge(sets: Sequence[WorkingSet], *, min_runs: int = 1,
          names: Sequence[str] | None = None) -> WorkingSet:
    """The pages seen in at least ``min_runs`` of ``sets``, ordered by mean first-touch rank.

    A page's rank in one input is its position divided by that input's length (0 first,
    towards 1 last), so long and short recordings weigh the same; a page **missing from
    an input counts as rank 1.0** there (after everything that input touched): a page
    every run needs early comes before one that some runs did not need at all.  Ties go to
    the lower page.  A page is written if its first access was a write in any input.  Each
    input counts as one run for ``min_runs``; the result's ``runs`` is the sum of theirs.
    Inputs must agree on page size, snapshot size and identity (:class:`WorkingSetMismatch`
    naming the input otherwise)."""
    if not sets:
        raise ValueError("nothing to merge")
    if not 1 <= min_runs <= len(sets):
        raise ValueError(f"min_runs must be 1..{len(sets)} (the number of inputs), not "
                         f"{min_runs}")
    labels = list(names) if names is not None else [f"input {i}" for i in range(len(sets))]
    first = sets[0]
    sid = first.snapshot_id
    for ws, label in zip(sets[1:], labels[1:], strict=False):
        ws.check(page_size=first.page_size, store_pages=first.store_pages, snapshot_id=sid,
                 what=label)
        if sid == NO_ID:
            sid = ws.snapshot_id
    seen: dict[int, int] = {}
    rank_sum: dict[int, float] = {}
    written: set[int] = set()
    for ws in sets:
        n = len(ws.order)
        for i, p in enumerate(ws.order):
            seen[p] = seen.get(p, 0) + 1
            rank_sum[p] = rank_sum.get(p, 0.0) + i / n
        written |= ws.written
    k = len(sets)
    keep = [p for p, c in seen.items() if c >= min_runs]
    # missing from (k - seen) inputs: rank 1.0 each
    keep.sort(key=lambda p: ((rank_sum[p] + (k - seen[p])) / k, p))
    return WorkingSet(first.page_size, first.store_pages, tuple(keep),
                      frozenset(written.intersection(keep)), sid, sum(ws.runs for ws in sets))


# ---- replay / fill plan -----------------------------------------------------------------


class InstallPlan:
    """What a replay installs, batch by batch: the set first, then (``fill``) the rest.

    ``bounds`` are the ``[lo, hi)`` store-page ranges being served (a client's mappings);
    pages outside them are ignored.  :meth:`batches` yields ``(phase, runs)``: the set in
    chunks of ``chunk`` pages taken in first-touch order, each chunk sorted and cut into
    runs of consecutive pages (at most ``max_run`` long) so one copy installs a run; then,
    with ``fill``, every page still missing ascending, ``chunk`` pages of address space
    per batch.  ``skip(page)`` must report the pages already resolved (present, in flight,
    installed by an earlier batch); it is consulted lazily, when a batch is made."""

    def __init__(self, ws: WorkingSet, bounds: Iterable[tuple[int, int]], *,
                 fill: bool = False, chunk: int = 256, max_run: int = 256) -> None:
        if chunk < 1 or max_run < 1:
            raise ValueError("chunk and max_run must be >= 1")
        self.ws = ws
        self.bounds = sorted((lo, hi) for lo, hi in bounds if lo < hi)
        self._los = [lo for lo, _ in self.bounds]
        self.fill = fill
        self.chunk = chunk
        self.max_run = max_run
        self.set_pages = sum(1 for p in ws.order if self.served(p))
        self.fill_pages = sum(hi - lo for lo, hi in self.bounds) - self.set_pages \
            if fill else 0

    def served(self, page: int) -> bool:
        i = bisect.bisect_right(self._los, page) - 1
        return i >= 0 and page < self.bounds[i][1]

    def runs(self, pages: Sequence[int]) -> list[tuple[int, int]]:
        """Runs of consecutive pages (``pages`` sorted), cut at max_run and at bounds."""
        runs: list[tuple[int, int]] = []
        ends = {hi for _, hi in self.bounds}
        for p in pages:
            if runs:
                first, n = runs[-1]
                if p == first + n and n < self.max_run and p not in ends:
                    runs[-1] = (first, n + 1)
                    continue
            runs.append((p, 1))
        return runs

    def set_chunks(self, skip: Callable[[int], bool] | None = None) -> Iterator[list[int]]:
        """The set's served pages, ``chunk`` at a time in first-touch order, each chunk
        sorted; ``skip`` (None: no call per page) filters pages already resolved."""
        order = self.ws.order
        served = self.served
        for i in range(0, len(order), self.chunk):
            if skip is not None:
                pages = sorted(p for p in order[i:i + self.chunk] if served(p) and not skip(p))
            else:
                pages = sorted(p for p in order[i:i + self.chunk] if served(p))
            if pages:
                yield pages

    def fill_batches(self, skip: Callable[[int], bool]) -> Iterator[list[tuple[int, int]]]:
        """Every served page ``skip`` does not report resolved, ascending, as runs;
        ``chunk`` pages of address space per batch (set pages a copy could not install
        come again here)."""
        for lo, hi in self.bounds:
            for start in range(lo, hi, self.chunk):
                pages = [p for p in range(start, min(start + self.chunk, hi)) if not skip(p)]
                if pages:
                    yield self.runs(pages)

    def batches(self, skip: Callable[[int], bool], *, check_set: bool = True
                ) -> Iterator[tuple[Phase, list[tuple[int, int]]]]:
        """:meth:`set_chunks` as runs, then (``fill``) :meth:`fill_batches`.
        ``check_set=False``: the set phase does not ask ``skip`` (the caller knows no
        set page can be resolved by it: each comes once), which saves a call per page."""
        for pages in self.set_chunks(skip if check_set else None):
            yield "set", self.runs(pages)
        if self.fill:
            for runs in self.fill_batches(skip):
                yield "fill", runs
