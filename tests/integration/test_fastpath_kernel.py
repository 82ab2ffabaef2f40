"""Fault-path details on the real kernel: shared rings, re-drain, the bench handler."""

from __future__ import annotations

import asyncio

import uffd_aio
from uffd_aio.bench.store import PatternStore, attach

from .helpers import PS, pattern_handler, scan


async def test_multishot_pagers_share_a_ring() -> None:
    """Each pager's multishot read gets its own buffer group and frees it on close."""
    ring = uffd_aio.Ring()
    try:
        for _ in range(3):  # successive clients of one server
            async with uffd_aio.Pager(ring=ring, read_mode="multishot") as pager:
                region = pager.map(32 * PS)
                region.on_fault(pattern_handler)
                assert (await scan(region.address, region.length, op="verify")).mismatches == 0
        pagers = [uffd_aio.Pager(ring=ring, read_mode="multishot") for _ in range(2)]
        for p in pagers:  # and concurrent ones
            p.start()
        regions = [p.map(32 * PS) for p in pagers]
        for r in regions:
            r.on_fault(pattern_handler)
        res = await asyncio.gather(*(scan(r.address, r.length, op="verify") for r in regions))
        assert [r.mismatches for r in res] == [0, 0]
        for p in pagers:
            await p.aclose()
        assert not ring._bufrings
    finally:
        ring.close()


async def test_bench_readahead_handler_serves_every_page_once() -> None:
    store = PatternStore(256 * PS)
    async with uffd_aio.Pager() as pager:
        region = pager.map(256 * PS)
        attach(region, store, 16)
        r = await scan(region.address, region.length, threads=4, op="verify", order="random")
        assert r.mismatches == 0
        st = pager.stats
        assert st.resolved_bytes >= 256 * PS and st.errors == 0
        assert st.faults < 256  # the windows did read ahead
