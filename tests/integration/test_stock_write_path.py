"""On a kernel without the uffd_aio series: the ring backend and poll mode say why not."""

from __future__ import annotations

import os

import pytest

import uffd_aio
from uffd_aio import Feature, resolve_ring
from uffd_aio.uffd import Userfaultfd

from .helpers import PS, pattern_handler, scan

pytestmark = pytest.mark.skipif(
    bool(uffd_aio.available_features() & (Feature.WRITE | Feature.POLL)),
    reason="patched kernel: tests/vm/test_ring_write.py covers it")


async def test_auto_uses_ioctls() -> None:
    async with uffd_aio.Pager() as pager:
        assert pager.backend == "ioctl" and pager.poll_budget_ns == 0
        assert not pager.features & Feature.WRITE
        region = pager.map(8 * PS)
        region.on_fault(pattern_handler)
        assert (await scan(region.address, region.length, op="verify")).mismatches == 0
        st = pager.stats
        assert st.backend == "ioctl" and st.ioctls >= 1 and st.ring_writes == 0


async def test_ring_backend_names_the_missing_feature() -> None:
    with pytest.raises(uffd_aio.FeatureUnavailable, match="WRITE"):
        async with uffd_aio.Pager(backend="ring"):
            pass
    uffd = Userfaultfd.open()  # a handed-over uffd: no UFFDIO_API by us
    try:
        with pytest.raises(uffd_aio.FeatureUnavailable, match="WRITE"):
            async with uffd_aio.Pager(uffd=uffd, backend="ring"):
                pass
    finally:
        uffd.close()


@pytest.mark.parametrize("kw", [{"poll": True}, {"poll_budget_us": 5}])
async def test_poll_mode_names_the_missing_feature(kw: dict[str, object]) -> None:
    with pytest.raises(uffd_aio.FeatureUnavailable, match="POLL"):
        async with uffd_aio.Pager(**kw):  # type: ignore[arg-type]
            pass


def test_probes_explain() -> None:
    ok, reason = resolve_ring.probe_write_path()
    assert not ok and "UFFD_FEATURE_WRITE" in reason and os.uname().release in reason
    ok, reason = resolve_ring.probe_poll_mode()
    assert not ok and "UFFD_FEATURE_POLL" in reason
