"""``--record`` and ``--record-set`` on the native engine, through ``HandoffServer``.

The client is the benchmarks' C ``workload`` with one thread (a fault sequence fixed by
its seeds) and two mappings: the same run is recorded with the engine (every fault
resolved in C, first touches from its log) and on the Python path (``native=False``),
and the saved trace and set must be the same files' content.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_handoff_server import (
    TEST_TIMEOUT,
    children,
    parse,
    serving,
    workload_args,
)
from tests.integration.test_workingset_server import PAGES, SET_SEED, snapshot, workload
from tests.limits import limit
from uffd_aio import workingset
from uffd_aio.serving.readahead import read_trace
from uffd_aio.stores.file import FileBackend

__all__ = ["snapshot", "workload"]  # fixtures

pytestmark = pytest.mark.timeout(TEST_TIMEOUT)

SUBSET = 200  # permille


def _args(wl: Path, sock: str, *extra: Any) -> list[Any]:
    return workload_args(wl, sock, PAGES, 1, 2, "--order", "random", "--subset", SUBSET,
                         "--set-seed", SET_SEED, "--seed", 5, *extra)


async def _record(wl: Path, snap: Path, sock: str, *, native: bool, extra: tuple[Any, ...] = (),
                  **kw: Any) -> Any:
    backend = await FileBackend.open(snap)
    try:
        async with serving(sock, backend, native=native, **kw) as server, children() as kids:
            rc, out, err = await kids.finish(await kids.start(*_args(wl, sock, *extra)))
            assert rc == 0, (out, err)
            assert parse(out)["verified"] is True
            await server.wait_clients(0, timeout=limit(10))
            st = server.stats
            if native:
                assert st.native_regions == 2 and st.python_regions == 0
                assert st.python_faults == 0 and st.native_faults > 0
            else:
                assert st.native_regions == 0 and st.native_faults == 0
            return st
    finally:
        await backend.aclose()


@pytest.mark.parametrize("readahead", ["off", "fixed:4", "adaptive"])
async def test_record_trace_same_as_python(workload: Path, snapshot: Path, tmp_path: Path,
                                           readahead: str) -> None:
    sock = str(tmp_path / "uffd.sock")
    traces, placed = {}, {}
    for native in (True, False):
        traces[native] = tmp_path / f"{native}.trace"
        st = await _record(workload, snapshot, sock, native=native, record=traces[native],
                           attach_options={"readahead": readahead})
        placed[native] = st.resolved_bytes // 4096
    ps_n, native_order = read_trace(traces[True])
    ps_p, python_order = read_trace(traces[False])
    assert ps_n == ps_p == 4096
    # each page placed, once, in the order of the faults that placed them
    assert len(native_order) == len(set(native_order)) == placed[True]
    assert len(python_order) == placed[False]
    if readahead == "adaptive":
        # the engine's adaptive windows may end a few pages apart from AdaptiveWindow's
        # on a random order (what each placed is what each recorded): the faults agree
        first = {p for p in python_order if p in set(native_order)}
        assert len(first) > 0.9 * len(python_order)
    else:
        assert native_order == python_order
    n = len(native_order)
    if readahead == "off":
        assert 0.15 * PAGES < n < 0.25 * PAGES  # the subset, nothing else
    elif readahead == "fixed:4":
        assert n > 0.25 * PAGES  # and the windows' pages


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
async def test_record_set_same_as_python(workload: Path, snapshot: Path, tmp_path: Path,
                                         write: bool) -> None:
    """--record-set and --record together, with a read-ahead asked for: on both paths the
    window is one page (a window would hide touches from the set), so the trace is the
    set's order."""
    sock = str(tmp_path / "uffd.sock")
    sets, traces = {}, {}
    extra = ("--write",) if write else ()
    for native in (True, False):
        sets[native] = tmp_path / f"{native}.ws"
        traces[native] = tmp_path / f"{native}.trace"
        st = await _record(workload, snapshot, sock, native=native, extra=extra,
                           record_set=sets[native], record=traces[native],
                           attach_options={"readahead": "fixed:8"})
        if native:
            assert st.native_faults >= 0.15 * PAGES  # one fault a page: no window
    a, b = workingset.read(sets[True]), workingset.read(sets[False])
    assert a.order == b.order and a.written == b.written
    assert (a.page_size, a.store_pages, a.snapshot_id) == (b.page_size, b.store_pages,
                                                            b.snapshot_id)
    assert 0.15 * PAGES < len(a.order) < 0.25 * PAGES
    assert a.written == (frozenset(a.order) if write else frozenset())
    assert list(read_trace(traces[True])[1]) == list(a.order)


async def test_record_set_bounded_by_pages(workload: Path, snapshot: Path,
                                           tmp_path: Path) -> None:
    sock = str(tmp_path / "uffd.sock")
    sets = {}
    for native in (True, False):
        sets[native] = tmp_path / f"{native}.ws"
        await _record(workload, snapshot, sock, native=native, record_set=sets[native],
                      record_set_pages=100)
    a, b = workingset.read(sets[True]), workingset.read(sets[False])
    assert len(a.order) == 100 and a.order == b.order


async def test_client_killed_mid_record(workload: Path, snapshot: Path,
                                        tmp_path: Path) -> None:
    """A client killed while it waits (after its touches, before it exits): what the
    engine served is in the files saved at its release, the same as a complete run's."""
    sock = str(tmp_path / "uffd.sock")
    full = tmp_path / "full.ws"
    await _record(workload, snapshot, sock, native=True, record_set=full)
    want = workingset.read(full)
    ws, trace = tmp_path / "killed.ws", tmp_path / "killed.trace"
    backend = await FileBackend.open(snapshot)
    try:
        async with serving(sock, backend, record_set=ws, record=trace) as server, \
                children() as kids:
            p = await kids.start(*_args(workload, sock, "--then-wait",
                                        tmp_path / "never"))
            async with asyncio.timeout(limit(30)):
                # polled: the server has no event for "this many faults"
                while sum(c.native_faults for c in server.clients) < len(want.order):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            p.send_signal(signal.SIGKILL)
            await p.wait()
            await server.wait_clients(0, timeout=limit(10))
            assert server.stats.python_faults == 0
    finally:
        await backend.aclose()
    got = workingset.read(ws)
    assert got.order == want.order
    assert list(read_trace(trace)[1]) == list(want.order)
