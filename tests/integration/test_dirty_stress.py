"""Dirty tracking under eviction: no write is ever lost (issue 11, bug 1).

Native writer threads stamp whole pages with generation numbers while the
evictor keeps a 4 MiB region under a 512 KiB budget (adaptive read-ahead, so
windows of up to 64 pages race with the evictor); at the end every page must
hold its last stamp, read back through the pager (resident pages as they are,
evicted ones from the store).  A lost write shows up as an older generation.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

import uffd_aio
from tests.limits import IN_GUEST_SCALE, limit
from uffd_aio import testing
from uffd_aio.modes import DEFAULT_FEATURES, Feature
from uffd_aio.serving import attach
from uffd_aio.serving.dirty import DirtyTracker
from uffd_aio.stores.base import Buffer

from .helpers import PS

NPAGES = 1024  # 4 MiB
BUDGET = 512 << 10
# 10 rounds per variant on the host, 1 in the VM lane (tests/limits.py); the variable overrides
ROUNDS = int(os.environ.get("UFFD_AIO_STRESS_ROUNDS") or (1 if IN_GUEST_SCALE else 10))
ROUND_TIMEOUT = limit(60.0)


class StampStore:
    """An in-memory store that starts with every page at generation 0."""

    name = "stamps"

    def __init__(self, npages: int) -> None:
        self.data = bytearray(b"".join(testing.stamp_page(p, 0) for p in range(npages)))
        self.stores = 0

    async def fetch(self, offset: int, length: int) -> Buffer | None:
        return bytes(self.data[offset:offset + length])

    async def store(self, offset: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        self.data[offset:offset + view.nbytes] = view
        self.stores += 1

    async def aclose(self) -> None:
        pass


def _inject_eagain(pager: uffd_aio.Pager, rate: float, seed: int) -> None:
    """Make a share of the unprotects fail with EAGAIN first, as they do while an
    madvise (EVENT_REMOVE) is in flight: the pager retries them 1 ms later, which
    is the window in which the evictor used to take the page."""
    from uffd_aio.resolve import Kind
    from uffd_aio.uffd import MmChanging

    rng = random.Random(seed)
    backend = pager._sync_backend
    orig = backend.execute

    def execute(uffd: object, op: object) -> object:
        if getattr(op, "kind", None) is Kind.UNPROTECT and rng.random() < rate:
            raise MmChanging(op="UFFDIO_WRITEPROTECT", address=getattr(op, "address", 0),
                             length=PS, done=0)
        return orig(uffd, op)  # type: ignore[arg-type]

    backend.execute = execute  # type: ignore[method-assign]


async def _round(i: int, *, remove_events: bool, eagain: float) -> tuple[int, int, int]:
    features = DEFAULT_FEATURES if remove_events else DEFAULT_FEATURES & ~Feature.EVENT_REMOVE
    store = StampStore(NPAGES)
    async with uffd_aio.Pager(features=features, backend="ioctl") as pager:
        if eagain:
            _inject_eagain(pager, eagain, seed=i)
        region = pager.map(NPAGES * PS, mode=uffd_aio.Mode.MISSING | uffd_aio.Mode.WP)
        tracker = DirtyTracker(max_resident=BUDGET, batch_pages=64)
        att = attach(region, store, readahead="adaptive", dirty=tracker)
        run = testing.StampRun(region.address, NPAGES, threads=2, passes=3, order="mixed",
                               rng_seed=i + 1)
        try:
            await run.run()
            first, bad = await run.verify()
        finally:
            run.stop()
            await att.aclose()
        evicted = tracker.evicted_pages
        assert pager.stats.errors == 0
    if bad:
        p = first
        got_gen = int.from_bytes(store.data[p * PS + 8:p * PS + 16], "little")
        pytest.fail(f"round {i}: {bad} page(s) lost a write; first: page {p}, last written "
                    f"generation {run.gen(p)}, the store has generation {got_gen} "
                    f"({evicted} pages evicted)")
    return bad, evicted, store.stores


@pytest.mark.parametrize(("remove_events", "eagain"), [(True, 0.0), (False, 0.0), (True, 0.2)],
                         ids=["remove", "no-remove", "remove+eagain"])
async def test_no_write_is_lost_under_eviction(remove_events: bool, eagain: float) -> None:
    evicted = 0
    for i in range(ROUNDS):
        async with asyncio.timeout(ROUND_TIMEOUT):
            _, ev, _ = await _round(i, remove_events=remove_events, eagain=eagain)
        evicted += ev
    assert evicted > 0, "the budget never made the evictor run: the test tests nothing"


class GatedStore:
    """Zeros; ``store()`` waits for ``gate`` (when set) before it writes."""

    name = "gated"

    def __init__(self, npages: int) -> None:
        self.data = bytearray(npages * PS)
        self.gate: asyncio.Future[object] | None = None

    async def fetch(self, offset: int, length: int) -> Buffer | None:
        return bytes(self.data[offset:offset + length])

    async def store(self, offset: int, data: Buffer) -> None:
        if self.gate is not None:
            await asyncio.wait([self.gate], timeout=10)
        view = memoryview(data).cast("B")
        self.data[offset:offset + view.nbytes] = view

    async def aclose(self) -> None:
        pass


async def test_a_delayed_unprotect_cannot_wake_a_writer_into_a_page_being_evicted() -> None:
    """The interleaving the stress test found, made deterministic.

    A write to a clean write-protected page P: the WP fault marks P dirty and
    unprotects it, but the kernel answers EAGAIN (an madvise is in progress; here
    injected), so the unprotect is retried 1 ms later.  Meanwhile the evictor runs a
    batch.  Before the fix it took P: write-protected it, read the old content, and
    (its store() held here until the writer is done) the delayed unprotect woke the
    writer, whose write landed before the page was dropped: lost.
    """
    from uffd_aio.resolve import Kind
    from uffd_aio.uffd import MmChanging

    async with asyncio.timeout(limit(30)):
        store = GatedStore(4)
        async with uffd_aio.Pager() as pager:
            region = pager.map(4 * PS, mode=uffd_aio.Mode.MISSING | uffd_aio.Mode.WP)
            tracker = DirtyTracker(max_resident=64 * PS)  # no automatic eviction
            att = attach(region, store, readahead="off", dirty=tracker)
            assert (await testing.read_catching(region.address, PS)).sigbus == []  # P: clean, WP

            loop = asyncio.get_running_loop()
            writer = loop.create_future()
            store.gate = writer
            rounds: list[asyncio.Task[bool]] = []

            async def evict_now() -> bool:
                victims = tracker._pick()
                return await tracker._evict(victims) if victims else False

            backend = pager._sync_backend
            orig = backend.execute

            def execute(uffd: object, op: object) -> object:
                if getattr(op, "kind", None) is Kind.UNPROTECT and not rounds:
                    rounds.append(loop.create_task(evict_now()))
                    raise MmChanging(op="UFFDIO_WRITEPROTECT", address=region.address,
                                     length=PS, done=0)
                return orig(uffd, op)  # type: ignore[arg-type]

            backend.execute = execute  # type: ignore[method-assign]
            try:
                scan = await testing.scan(region.address, PS, op="write")
                assert scan.mismatches == 0
            finally:
                writer.set_result(None)
                backend.execute = orig  # type: ignore[method-assign]
            assert rounds, "the unprotect was never attempted"
            await rounds[0]
            assert pager.stats.eagain_retries >= 1 and pager.stats.errors == 0
            await evict_now()  # now P is dirty and idle: written back, then dropped
            got = await testing.read_catching(region.address, PS)
            await att.aclose()
        assert got.sigbus == []
        assert got.data == testing.pattern_bytes(0, PS), "the write was lost"
