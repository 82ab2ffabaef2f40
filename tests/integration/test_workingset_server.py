"""Working-set record / merge / replay / fill through ``HandoffServer``, end to end.

The clients are the benchmarks' C ``workload`` in child processes: it touches a fixed
random subset of its pages (``--subset``, chosen by ``--set-seed``) in an order that
changes with ``--seed``, and verifies every byte it touched (``--then-wait``: every
page, after the test says so).  Nothing here asserts a time: the checks are counts
(demand faults against the set's size, faults after the fill).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.integration.helpers import drop_page_cache, resident_pages
from tests.integration.test_handoff_server import (
    ROOT,
    TEST_TIMEOUT,
    _build,
    _exists,
    children,
    parse,
    serving,
    workload_args,
)
from tests.limits import limit
from uffd_aio import testing, workingset
from uffd_aio.stores.file import FileBackend
from uffd_aio.workingset import WorkingSetMismatch

pytestmark = pytest.mark.timeout(TEST_TIMEOUT)

PAGES = 8192  # the whole snapshot fixture (32 MiB)
SUBSET = 300  # permille: 30% of the pages
SET_SEED = 77


@pytest.fixture(scope="module")
def workload() -> Path:
    return _build(ROOT / "benchmarks" / "c", "build/workload")


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wssnap") / "mem.snap"
    path.write_bytes(testing.pattern_bytes(0, PAGES * 4096))
    return path


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "uffd.sock")


def _subset_args(seed: int, *extra: Any) -> list[Any]:
    return ["--order", "random", "--subset", SUBSET, "--set-seed", SET_SEED, "--seed", seed,
            *extra]


async def _run(kids: Any, sock: str, wl: Path, seed: int, *extra: Any) -> dict[str, Any]:
    rc, out, err = await kids.finish(await kids.start(
        *workload_args(wl, sock, PAGES, 2, 1, *_subset_args(seed, *extra))))
    assert rc == 0, (out, err)
    doc = parse(out)
    assert doc["verified"] is True
    return doc


async def _record(wl: Path, snap: Path, sock: str, out: Path, seed: int) -> None:
    backend = await FileBackend.open(snap)
    try:
        async with serving(sock, backend, record_set=out) as server, children() as kids:
            await _run(kids, sock, wl, seed)
            await server.wait_clients(0, timeout=limit(10))
            # recorded from the engine's first-touch log: every fault served in C
            assert server.stats.native_regions == 1 and server.stats.python_faults == 0
    finally:
        await backend.aclose()


async def test_record_merge_replay_set(workload: Path, snapshot: Path, sock_path: str,
                                       tmp_path: Path) -> None:
    runs = [tmp_path / f"run{i}.ws" for i in range(3)]
    for i, path in enumerate(runs):
        await _record(workload, snapshot, sock_path, path, seed=i + 1)
    sets = [workingset.read(p) for p in runs]
    touched = len(sets[0])
    assert 0.25 * PAGES < touched < 0.35 * PAGES
    # the same set each run, in another order
    assert all(s.pages == sets[0].pages for s in sets) and sets[0].order != sets[1].order
    assert sets[0].store_pages == PAGES and sets[0].snapshot_id != workingset.NO_ID
    merged = workingset.merge(sets, min_runs=2)
    assert merged.pages == sets[0].pages and merged.runs == 3
    workingset.write(tmp_path / "merged.ws", merged)

    backend = await FileBackend.open(snapshot)
    try:
        with capture_logs() as logs:
            async with serving(sock_path, backend, replay=tmp_path / "merged.ws") as server, \
                    children() as kids:
                await _run(kids, sock_path, workload, seed=99)  # every byte verified
                await server.wait_clients(0, timeout=limit(10))
                assert server.stats.native_regions == 1  # faults still served in C
        released = [e for e in logs if e["event"] == "uffd_aio.client_released"]
        assert released and released[0]["errors"] == 0
        demand = released[0]["faults"]
        installed = [e for e in logs if e["event"] == "uffd_aio.workingset_installed"]
        by_replay = released[0]["ws_pages_by_replay"]
        print(f"demand faults {demand} of {touched} set pages")  # shown with -s
        # the target: at most 5% of the set's pages left to demand faults
        assert demand <= 0.05 * touched, (demand, touched, installed, released)
        assert by_replay + demand >= touched * 0.95
        assert released[0]["ws_pages_by_fill"] == 0
    finally:
        await backend.aclose()


async def _replay_with_fill(workload: Path, snapshot: Path, sock_path: str, ws: Path,
                           go: Path, *, wait: float) -> tuple[dict[str, Any], int, int,
                                                             list[dict[str, Any]]]:
    """Serve ``snapshot`` with ``--replay ws --fill`` to a client that waits for ``go``
    after touching its set, then reads every page (all verified); returns the installer's
    metrics, the client's faults before the second touch, the server's ws_pages_read and
    the events logged."""
    backend = await FileBackend.open(snapshot)
    try:
        with capture_logs() as logs:
            async with serving(sock_path, backend, replay=ws, fill=True) as server, \
                    children() as kids:
                p = await kids.start(*workload_args(
                    workload, sock_path, PAGES, 2, 1, *_subset_args(6, "--then-wait", go)))
                await server.wait_clients(1, timeout=limit(10))
                cid = server.clients[0].id
                async with asyncio.timeout(limit(wait)):
                    while not (m := server.workingset_metrics(cid)) or \
                            not m["done"]:  # noqa: ASYNC110 (the server has no event for it)
                        await asyncio.sleep(0.01)
                assert m["fully_resident_s"] is not None
                before = server.clients[0].faults
                go.touch()  # noqa: ASYNC240 (an empty file: the client reads every page now)
                rc, out, err = await kids.finish(p)
                assert rc == 0, (out, err)
                doc = parse(out)
                assert doc["verified"] is True and doc["verified_all"] is True
                await server.wait_clients(0, timeout=limit(10))
                pages_read = server.stats.ws_pages_read
    finally:
        await backend.aclose()
    return m, before, pages_read, logs


async def test_replay_set_with_fill_leaves_no_faults(workload: Path, snapshot: Path,
                                                     sock_path: str, tmp_path: Path) -> None:
    await _record(workload, snapshot, sock_path, tmp_path / "a.ws", seed=5)
    m, before, _, logs = await _replay_with_fill(
        workload, snapshot, sock_path, tmp_path / "a.ws", tmp_path / "go", wait=30)
    released = [e for e in logs if e["event"] == "uffd_aio.client_released"]
    assert released[0]["faults"] == before  # the second touch of all pages: no fault
    assert m["pages_by_replay"] + m["pages_by_fill"] + before >= PAGES * 0.99
    assert m["pages_by_fill"] > 0
    assert any(e["event"] == "uffd_aio.workingset_installed" for e in logs)


def _evict(path: Path) -> bool:
    """Drop ``path`` from the page cache; False where the file system keeps it (tmpfs)."""
    drop_page_cache(path)
    return resident_pages(path, PAGES * 4096) < PAGES // 8


async def test_replay_cold_snapshot_reads_with_io_uring(workload: Path, sock_path: str,
                                                        tmp_path: Path) -> None:
    """A snapshot evicted from the page cache: the set and the fill are read with io_uring
    READs on the server's ring (never by a copy faulting the mapping on the loop), every
    byte arrives, and the client ends with no faults left."""
    snap = tmp_path / "cold.snap"
    snap.write_bytes(testing.pattern_bytes(0, PAGES * 4096))
    await _record(workload, snap, sock_path, tmp_path / "a.ws", seed=5)
    if not _evict(snap):
        pytest.skip("posix_fadvise(DONTNEED) left the snapshot in the page cache here")
    m, before, pages_read, logs = await _replay_with_fill(
        workload, snap, sock_path, tmp_path / "a.ws", tmp_path / "go", wait=60)
    released = [e for e in logs if e["event"] == "uffd_aio.client_released"]
    assert pages_read == m["pages_read"]
    assert released[0]["errors"] == 0 and released[0]["faults"] == before
    # cold: the installer read with io_uring (the pages its READs brought into the page
    # cache beside the ones it wanted are copied from the mapping later, not counted)
    assert m["reads"] > 0 and m["pages_read"] > 0, m
    assert m["pages_by_replay"] + m["pages_by_fill"] + before >= PAGES * 0.99


async def test_mismatched_working_set_is_rejected(snapshot: Path, sock_path: str,
                                                  tmp_path: Path) -> None:
    backend = await FileBackend.open(snapshot)
    try:
        other = workingset.WorkingSet(4096, PAGES * 2, (1, 2, 3))
        workingset.write(tmp_path / "big.ws", other)
        with pytest.raises(WorkingSetMismatch, match=f"snapshot of {PAGES * 2} pages"):
            async with serving(sock_path, backend, replay=tmp_path / "big.ws"):
                pass
        foreign = workingset.WorkingSet(4096, PAGES, (1, 2, 3),
                                        snapshot_id=workingset.id_from_text("another VM"))
        workingset.write(tmp_path / "foreign.ws", foreign)
        with pytest.raises(WorkingSetMismatch, match="another snapshot"):
            async with serving(sock_path, backend, replay=tmp_path / "foreign.ws"):
                pass
        (tmp_path / "junk").write_bytes(b"UFFDWSET" + bytes(10))
        with pytest.raises(ValueError, match="too short"):
            async with serving(sock_path, backend, replay=tmp_path / "junk"):
                pass
        with pytest.raises(ValueError, match="fill needs a working set"):
            async with serving(sock_path, backend, fill=True):
                pass
        assert not _exists(sock_path)
    finally:
        await backend.aclose()
