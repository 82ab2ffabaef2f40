"""attach() + backends on the real kernel: compressed and Redis end to end, read-ahead,
dirty tracking and eviction under a budget, Redis restarted mid-run, record/replay.

Memory is touched only by native threads (uffd_aio.testing); Redis tests start a private
redis-server on a free port in a temporary directory and kill it afterwards (they skip
when /usr/bin/redis-server is missing: `apt-get install redis-server`).
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

import uffd_aio
from examples.remote_memory.redis_local import LocalRedis, LocalRedisCluster, RedisNotInstalled
from tests.limits import limit
from tests.limits import size as scaled
from uffd_aio import Mode, testing
from uffd_aio.binding import lowlevel as ll
from uffd_aio.serving import attach
from uffd_aio.serving.dirty import DirtyTracker
from uffd_aio.serving.readahead import read_trace
from uffd_aio.stores import open_backend
from uffd_aio.stores.base import BackendError, Buffer
from uffd_aio.stores.compressed import CompressedBackend
from uffd_aio.stores.remote import RedisBackend

from .helpers import PS, scan

MiB = 1 << 20
SEED_B = 0xB0B


def compressed_with_pattern(size: int, seed: int = testing.DEFAULT_SEED) -> CompressedBackend:
    be = CompressedBackend()
    for off in range(0, size, 4 * MiB):
        be.load(off, testing.pattern_bytes(off, min(4 * MiB, size - off), seed=seed))
    return be


async def store_matches(be: CompressedBackend | RedisBackend, size: int, seed: int) -> bool:
    for off in range(0, size, MiB):
        data = await be.fetch(off, MiB)
        if data is None or bytes(data) != testing.pattern_bytes(off, MiB, seed=seed):
            return False
    return True


class SlowBackend:
    """Wraps a backend: each fetch sleeps first and is recorded (offset, length)."""

    eager = True

    def __init__(self, inner: CompressedBackend, delay: float) -> None:
        self.inner, self.delay, self.name = inner, delay, "slow"
        self.calls: list[tuple[int, int]] = []

    async def fetch(self, offset: int, length: int) -> Buffer | None:
        self.calls.append((offset, length))
        await asyncio.sleep(self.delay)
        return await self.inner.fetch(offset, length)

    async def store(self, offset: int, data: Buffer) -> None:
        await self.inner.store(offset, data)

    async def aclose(self) -> None:
        pass


# ---- Redis fixtures ----------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    """A private redis-server on a free port of 127.0.0.1, killed after the test."""
    try:
        srv = LocalRedis(directory=str(tmp_path / "redis"))
    except RedisNotInstalled as exc:
        pytest.skip(f"needs redis-server: {exc}")
    srv.start()  # installed but not starting is a failure, not a skip
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
async def redis_backend(redis_server: LocalRedis) -> AsyncIterator[RedisBackend]:
    be = await RedisBackend.open(redis_server.url + "?prefix=t:", retry_for=20)
    try:
        yield be
    finally:
        await be.aclose()


async def load_redis(be: RedisBackend, size: int, seed: int = testing.DEFAULT_SEED) -> None:
    for off in range(0, size, 4 * MiB):
        await be.load(off, testing.pattern_bytes(off, min(4 * MiB, size - off), seed=seed))


# ---- compressed -----------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_compressed_end_to_end_with_adaptive_readahead() -> None:
    size = scaled(16 * MiB)
    be = compressed_with_pattern(size)
    async with uffd_aio.Pager() as pager:
        region = pager.map(size)
        att = attach(region, be, readahead="adaptive:32")
        r = await scan(region.address, size, threads=4, op="verify")
        assert r.mismatches == 0
        st = att.stats
        await att.aclose()
        assert st.pages_fetched >= size // PS
        assert st.fetches < size // PS // 8  # read-ahead worked
        assert st.present_pages == size // PS and st.fetch_errors == 0
        assert pager.stats.errors == 0


@pytest.mark.timeout(60)
async def test_zero_fetches_and_store_offset() -> None:
    be = CompressedBackend()
    be.load(8 * PS, testing.pattern_bytes(8 * PS, 8 * PS))  # store pages 8..15 only
    async with uffd_aio.Pager() as pager:
        region = pager.map(16 * PS)
        att = attach(region, be, store_offset=8 * PS, readahead=4)  # region page 0 = store 8
        r = await scan(region.address, 8 * PS, op="verify", offset=8 * PS)
        assert r.mismatches == 0
        await scan(region.address + 8 * PS, 8 * PS)  # store pages 16..23: never written
        data = await region.read(8 * PS, 8 * PS)
        assert data == bytes(8 * PS)
        assert att.stats.zero_fetches >= 1
        await att.aclose()


@pytest.mark.timeout(60)
async def test_concurrent_faults_in_one_window_fetch_once() -> None:
    be = SlowBackend(compressed_with_pattern(64 * PS), delay=0.05)
    async with uffd_aio.Pager() as pager:
        region = pager.map(64 * PS)
        att = attach(region, be, readahead=64)
        # 4 threads start at pages 0, 16, 32, 48 at once: the first fault's window
        # covers them all, the others wait for it
        r = await scan(region.address, region.length, threads=4, op="verify")
        assert r.mismatches == 0
        st = att.stats
        await att.aclose()
    assert st.fetches + st.readahead_hits >= 1
    assert st.pages_fetched == 64  # no page fetched twice
    assert sum(n for _, n in be.calls) == 64 * PS


@pytest.mark.timeout(60)
async def test_backend_failure_applies_the_error_policy() -> None:
    class Broken(SlowBackend):
        async def fetch(self, offset: int, length: int) -> Buffer | None:
            raise BackendError("store unreachable")

    be = Broken(CompressedBackend(), 0)
    async with uffd_aio.Pager(on_error="zero") as pager:
        region = pager.map(8 * PS)
        att = attach(region, be, readahead=4)
        await scan(region.address, region.length)
        assert await region.read(0, 8 * PS) == bytes(8 * PS)
        assert att.stats.fetch_errors >= 1 and pager.stats.errors >= 1
        await att.aclose()


@pytest.mark.timeout(60)
async def test_remove_forgets_the_range_and_refetches() -> None:
    size = 64 * PS
    be = compressed_with_pattern(size)
    async with uffd_aio.Pager() as pager:
        region = pager.map(size)
        att = attach(region, be, readahead=8)
        await scan(region.address, size, op="verify")
        assert att.stats.present_pages == 64
        # MADV_DONTNEED from a worker thread (the kernel holds it until we read REMOVE)
        await asyncio.to_thread(ll.madvise, region.address + 16 * PS, 16 * PS,
                                ll.MADV_DONTNEED)
        await asyncio.sleep(0.05)
        assert att.stats.present_pages == 48
        before = att.stats.pages_fetched
        r = await scan(region.address, size, op="verify")
        assert r.mismatches == 0
        assert att.stats.pages_fetched - before == 16
        await att.aclose()


@pytest.mark.timeout(60)
async def test_zero_removed_and_observe_are_attach_options() -> None:
    """zero_removed: faults on those page addresses read zeros without a fetch (what
    `uffd-aio serve --remove zero` keeps); observe: (store page, is write) of the others,
    before they are served."""
    be = compressed_with_pattern(16 * PS)
    seen: list[tuple[int, bool]] = []
    async with uffd_aio.Pager() as pager:
        region = pager.map(16 * PS)
        removed = {region.address + p * PS for p in (4, 5)}
        att = attach(region, be, store_offset=0, zero_removed=removed,
                     observe=lambda page, write: seen.append((page, write)))
        r = await scan(region.address, 4 * PS, op="verify")
        assert r.mismatches == 0
        await scan(region.address + 4 * PS, 2 * PS)  # the removed pages
        assert await region.read(4 * PS, 2 * PS) == bytes(2 * PS)
        st = att.stats
        await att.aclose()
    assert st.pages_fetched == 4 and st.present_pages == 4  # nothing fetched for 4 and 5
    assert sorted(p for p, _ in seen) == [0, 1, 2, 3]
    assert not any(w for _, w in seen)


# ---- dirty tracking and eviction ------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_dirty_tracking_and_eviction_under_a_budget_compressed() -> None:
    size, budget = scaled(32 * MiB), scaled(4 * MiB)
    be = compressed_with_pattern(size)
    async with uffd_aio.Pager() as pager:
        region = pager.map(size, mode=Mode.MISSING | Mode.WP)
        tracker = DirtyTracker(max_resident=budget, batch_pages=128)
        att = attach(region, be, readahead="adaptive:16", dirty=tracker)
        r = await scan(region.address, size, threads=4, op="verify")
        assert r.mismatches == 0
        # overwrite the first half with another pattern, then read everything back:
        # dirty pages must survive eviction (written back, re-fetched)
        await scan(region.address, size // 2, threads=4, op="write", seed=SEED_B)
        r = await scan(region.address, size // 2, threads=4, op="verify", seed=SEED_B)
        assert r.mismatches == 0, r.first_mismatch
        r = await scan(region.address + size // 2, size // 2, threads=4, op="verify",
                       offset=size // 2)
        assert r.mismatches == 0, r.first_mismatch
        assert tracker.evicted_pages > (size - budget) // PS
        assert tracker.written_back_pages > 0
        # the budget held, up to the soft margin: admission stops new faults at 1.1x,
        # faults already past that check add their windows (4 threads x 16 pages, x2 for
        # a window that was being waited for when another one started)
        assert tracker.peak_resident_pages * PS <= budget * 1.1 + 2 * 4 * 16 * PS
        await tracker.flush()
        assert tracker.dirty_pages == 0
        await att.aclose()
        assert pager.stats.errors == 0
    for off in range(0, size, MiB):
        want = testing.pattern_bytes(off, MiB, seed=SEED_B if off < size // 2 else
                                     testing.DEFAULT_SEED)
        assert await be.fetch(off, MiB) == want, f"store differs at {off:#x}"


@pytest.mark.timeout(60)
async def test_failing_write_back_keeps_dirty_pages_and_evicts_clean_ones() -> None:
    class NoStore(SlowBackend):
        async def store(self, offset: int, data: Buffer) -> None:
            raise BackendError("store is read-only")

    be = NoStore(compressed_with_pattern(64 * PS), 0)
    async with uffd_aio.Pager() as pager:
        region = pager.map(64 * PS, mode=Mode.MISSING | Mode.WP)
        tracker = DirtyTracker(max_resident=16 * PS, batch_pages=8, admission_wait=5)
        att = attach(region, be, dirty=tracker)
        await scan(region.address, 24 * PS, op="write", seed=SEED_B)  # 24 dirty > budget
        r = await scan(region.address + 24 * PS, 40 * PS, op="verify", offset=24 * PS)
        assert r.mismatches == 0
        r = await scan(region.address, 24 * PS, op="verify", seed=SEED_B)
        assert r.mismatches == 0  # nothing written was lost
        # eviction of the clean pages is timing-dependent (slow under TCG); the write-back
        # failure and that no dirty page was dropped are not
        assert tracker.writeback_failures > 0
        assert tracker.dirty_pages == 24
        await att.aclose()
        assert pager.stats.errors == 0


@pytest.mark.timeout(60)
async def test_wp_fault_marks_dirty_and_flush_reprotects() -> None:
    be = compressed_with_pattern(16 * PS)
    async with uffd_aio.Pager() as pager:
        region = pager.map(16 * PS, mode=Mode.MISSING | Mode.WP)
        tracker = DirtyTracker()
        att = attach(region, be, readahead=16, dirty=tracker)
        await scan(region.address, 16 * PS, op="verify")  # read: all clean
        assert tracker.dirty_pages == 0
        await scan(region.address + 4 * PS, 2 * PS, op="write", seed=SEED_B, offset=4 * PS)
        assert tracker.dirty_pages == 2 and tracker.is_dirty(4) and tracker.is_dirty(5)
        assert att.stats.wp_faults == 2
        assert await tracker.flush() == 2
        assert tracker.dirty_pages == 0
        assert await be.fetch(4 * PS, 2 * PS) == testing.pattern_bytes(4 * PS, 2 * PS,
                                                                       seed=SEED_B)
        # re-protected: the next write faults (and dirties) again
        await scan(region.address + 4 * PS, PS, op="write", offset=4 * PS)
        assert tracker.dirty_pages == 1 and att.stats.wp_faults == 3
        await att.aclose()


async def test_eviction_is_refused_for_handed_off_regions() -> None:
    async with uffd_aio.Pager() as pager:
        # adopt() only describes memory another process registered: no faults needed here
        region = pager.adopt(0x7F0000000000, 64 * PS, mode=Mode.MISSING | Mode.WP)
        tracker = DirtyTracker(max_resident=16 * PS)
        with structlog.testing.capture_logs() as logs:
            att = attach(region, CompressedBackend(), dirty=tracker)
        assert any(e["event"] == "uffd_aio.eviction_unsupported" for e in logs)
        assert not tracker._can_evict
        with pytest.raises(RuntimeError, match="another process"):
            await tracker.flush()
        await att.aclose()


async def test_dirty_factory_gives_each_region_its_tracker() -> None:
    be = compressed_with_pattern(8 * PS)
    factory = functools.partial(DirtyTracker, max_resident=4 * PS)
    async with uffd_aio.Pager() as pager:
        atts = [attach(pager.map(8 * PS, mode=Mode.MISSING | Mode.WP), be, dirty=factory)
                for _ in range(2)]
        a, b = (att.dirty for att in atts)
        assert isinstance(a, DirtyTracker) and isinstance(b, DirtyTracker) and a is not b
        assert a.max_resident == 4 * PS
        for att in atts:
            await att.aclose()


def test_dirty_tracking_needs_wp() -> None:
    async def go() -> None:
        async with uffd_aio.Pager() as pager:
            region = pager.map(4 * PS)
            with pytest.raises(ValueError, match=r"Mode\.WP"):
                attach(region, CompressedBackend(), dirty=DirtyTracker())

    asyncio.run(go())


# ---- record / replay ----------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_record_then_replay_prefetches_in_order(tmp_path: Path) -> None:
    size = 256 * PS
    be = compressed_with_pattern(size)
    trace = tmp_path / "faults.trace"
    async with uffd_aio.Pager() as pager:
        region = pager.map(size)
        att = attach(region, be, recorder=trace, store_offset=0)
        # touch a quarter of the pages in random order
        r = await scan(region.address, size // 4, op="verify", order="random")
        assert r.mismatches == 0
        await att.aclose()
    ps_, order = read_trace(trace)
    assert ps_ == PS and sorted(order) == list(range(64))

    slow = SlowBackend(be, delay=0.002)
    async with uffd_aio.Pager() as pager:
        region = pager.map(size)
        att = attach(region, slow, replay=trace, replay_concurrency=2, replay_batch=4)
        await asyncio.wait_for(att.wait_replayed(), limit(20))
        st = att.stats
        assert st.prefetched_pages == 64 and st.fetches == 0
        # the replay fetched in trace order (runs of consecutive pages merged)
        fetched = [off // PS + i for off, n in slow.calls for i in range(n // PS)]
        assert fetched == order
        r = await scan(region.address, size // 4, op="verify")
        assert r.mismatches == 0
        assert pager.stats.faults == 0  # everything was there before the workload
        await att.aclose()


@pytest.mark.timeout(60)
async def test_replay_runs_alongside_faults() -> None:
    size = 512 * PS
    slow = SlowBackend(compressed_with_pattern(size), delay=0.001)
    async with uffd_aio.Pager() as pager:
        region = pager.map(size)
        order = list(range(511, -1, -1))  # replay from the end while threads scan forward
        att = attach(region, slow, replay=order, readahead=8)
        r = await scan(region.address, size, threads=2, op="verify")
        assert r.mismatches == 0
        await asyncio.wait_for(att.wait_replayed(), limit(20))
        st = att.stats
        assert st.fetches > 0 and st.prefetches > 0
        # nothing fetched twice, except a fault that raced a prefetch's copy (its message
        # was queued before the copy landed): it fetches its single page again
        assert st.pages_fetched - st.refetches + st.prefetched_pages == 512
        await att.aclose()


@pytest.mark.timeout(60)
async def test_replay_yields_to_fault_fetches() -> None:
    size = 128 * PS
    inner = compressed_with_pattern(size)
    holder: list[Any] = []
    starts: list[tuple[int, int]] = []  # (offset, fault fetches in flight) per prefetch

    class Probe(SlowBackend):
        async def fetch(self, offset: int, length: int) -> Buffer | None:
            if offset >= 64 * PS:  # the replayed half
                starts.append((offset, holder[0]._fault_fetches))
            return await super().fetch(offset, length)

    be = Probe(inner, delay=0.003)
    async with uffd_aio.Pager() as pager:
        region = pager.map(size)
        att = attach(region, be, replay=list(range(64, 128)), replay_concurrency=1,
                     replay_batch=1, replay_max_wait=30)
        holder.append(att)
        r = await scan(region.address, 64 * PS, op="verify")  # faults on the other half
        assert r.mismatches == 0
        await asyncio.wait_for(att.wait_replayed(), limit(20))
        assert len(starts) == 64
        # no prefetch ever started while a fault's fetch was in flight
        assert all(n == 0 for _, n in starts), starts
        await att.aclose()


# ---- Redis ------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_redis_end_to_end_readahead_off_and_on(redis_backend: RedisBackend) -> None:
    size = scaled(8 * MiB)
    await load_redis(redis_backend, size)
    for ra, max_fetches in ((0, size // PS), ("adaptive:64", size // PS // 16)):
        async with uffd_aio.Pager() as pager:
            region = pager.map(size)
            att = attach(region, redis_backend, readahead=ra)
            r = await scan(region.address, size, threads=4, op="verify")
            assert r.mismatches == 0
            st = att.stats
            await att.aclose()
        assert st.pages_fetched == size // PS
        assert st.fetches <= max_fetches
        assert pager.stats.errors == 0


@pytest.mark.timeout(90)
async def test_redis_window_is_one_mget(redis_backend: RedisBackend) -> None:
    await load_redis(redis_backend, 64 * PS)
    calls: list[int] = []
    inner = redis_backend.client.mget

    async def mget(keys: list[bytes]) -> list[bytes | None]:
        calls.append(len(keys))
        return await inner(keys)

    redis_backend.client.mget = mget  # type: ignore[method-assign]
    async with uffd_aio.Pager() as pager:
        region = pager.map(64 * PS)
        att = attach(region, redis_backend, readahead=16)
        r = await scan(region.address, region.length, op="verify")
        assert r.mismatches == 0
        await att.aclose()
    assert calls == [16, 16, 16, 16]


@pytest.mark.timeout(60)
async def test_redis_concurrent_fetches_share_mgets(redis_backend: RedisBackend) -> None:
    await load_redis(redis_backend, 64 * PS)
    calls: list[int] = []
    inner = redis_backend.client.mget

    async def mget(keys: list[bytes]) -> list[bytes | None]:
        calls.append(len(keys))
        return await inner(keys)

    redis_backend.client.mget = mget  # type: ignore[method-assign]
    # 16 fetches issued in the same loop iteration: one MGET carries them all
    got = await asyncio.gather(*(redis_backend.fetch(i * 4 * PS, 4 * PS) for i in range(16)))
    assert calls == [64]
    for i, data in enumerate(got):
        assert data == testing.pattern_bytes(i * 4 * PS, 4 * PS)
    assert redis_backend.coalesced == 15
    # off: one request per fetch
    redis_backend.coalesce = False
    calls.clear()
    await asyncio.gather(*(redis_backend.fetch(i * 4 * PS, 4 * PS) for i in range(4)))
    assert calls == [4, 4, 4, 4]


@pytest.mark.timeout(90)
async def test_redis_restart_mid_run(redis_server: LocalRedis,
                                     redis_backend: RedisBackend) -> None:
    size = scaled(16 * MiB)
    await load_redis(redis_backend, size)
    redis_server.save()  # so the restarted server has the data
    progress: list[int] = []
    async with uffd_aio.Pager() as pager:
        region = pager.map(size)
        att = attach(region, redis_backend, readahead=0)
        task = asyncio.ensure_future(scan(region.address, size, threads=2, op="verify",
                                          progress=lambda d, t: progress.append(d),
                                          progress_interval=0.02, timeout=60))
        while not progress or progress[-1] < size // PS // 10:
            await asyncio.sleep(0.01)
            assert not task.done()
        redis_server.kill()  # crash mid-run
        await asyncio.sleep(0.7)
        stalled = progress[-1]
        await asyncio.sleep(0.3)
        assert progress[-1] - stalled <= 2  # faults wait while Redis is down
        await asyncio.to_thread(redis_server.start)  # restart: loads dump.rdb
        r = await task
        assert r.mismatches == 0
        st = att.stats
        await att.aclose()
    assert st.pages_fetched >= size // PS and st.fetch_errors == 0
    assert redis_backend.outages >= 1 and redis_backend.retries >= 1
    assert pager.stats.errors == 0


@pytest.mark.timeout(90)
async def test_redis_dirty_eviction_writes_back(redis_backend: RedisBackend) -> None:
    size, budget = scaled(8 * MiB), scaled(1 * MiB)
    await load_redis(redis_backend, size)
    async with uffd_aio.Pager() as pager:
        region = pager.map(size, mode=Mode.MISSING | Mode.WP)
        tracker = DirtyTracker(max_resident=budget, batch_pages=64)
        att = attach(region, redis_backend, readahead="adaptive:16", dirty=tracker)
        await scan(region.address, size, threads=2, op="write", seed=SEED_B)
        r = await scan(region.address, size, threads=2, op="verify", seed=SEED_B)
        assert r.mismatches == 0, r.first_mismatch
        assert tracker.evicted_pages > 0 and tracker.written_back_pages > 0
        await tracker.flush()
        await att.aclose()
        assert pager.stats.errors == 0
    assert await store_matches(redis_backend, size, SEED_B)


@pytest.mark.timeout(90)
async def test_redis_cluster_url_uses_the_cluster_client(tmp_path: Path) -> None:
    try:
        cluster = LocalRedisCluster(masters=3, directory=str(tmp_path / "cluster"))
    except RedisNotInstalled as exc:
        pytest.skip(f"needs redis-server and redis-cli: {exc}")
    await asyncio.to_thread(cluster.start)
    try:
        be = await open_backend(cluster.url + "?prefix=c:")
        assert isinstance(be, RedisBackend) and be.cluster
        try:
            size = 2 * MiB
            await load_redis(be, size)
            async with uffd_aio.Pager() as pager:
                region = pager.map(size)
                att = attach(region, be, readahead=32)  # one MGET per node per window
                r = await scan(region.address, size, threads=2, op="verify")
                assert r.mismatches == 0
                assert att.stats.fetches == size // PS // 32
                await att.aclose()
            await be.store(0, testing.pattern_bytes(0, 2 * PS, seed=SEED_B))
            assert await be.fetch(0, 2 * PS) == testing.pattern_bytes(0, 2 * PS, seed=SEED_B)
        finally:
            await be.aclose()
    finally:
        cluster.close()


def test_redis_server_fixture_kills_its_process(redis_server: LocalRedis) -> None:
    pid = redis_server.proc.pid if redis_server.proc else 0
    assert pid and os.path.exists(f"/proc/{pid}")
    redis_server.kill()
    assert redis_server.proc is not None and redis_server.proc.poll() is not None
