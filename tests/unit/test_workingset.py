"""uffd_aio.workingset (pure): the file format, the recorder, merge and the install plan."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uffd_aio import workingset as wsm
from uffd_aio.serving.readahead import encode_trace
from uffd_aio.workingset import (
    NO_ID,
    InstallPlan,
    WorkingSet,
    WorkingSetError,
    WorkingSetMismatch,
    WorkingSetRecorder,
    decode,
    merge,
)


@st.composite
def working_sets(draw: st.DrawFn, store_pages: int | None = None) -> WorkingSet:
    n = store_pages if store_pages is not None else draw(st.integers(0, 300))
    order = draw(st.permutations(range(n)).map(
        lambda perm: perm[:draw(st.integers(0, n))]))
    written = draw(st.frozensets(st.sampled_from(order))) if order else frozenset()
    sid = draw(st.sampled_from([NO_ID, wsm.id_from_text("snap-a")]))
    return WorkingSet(4096, n, tuple(order), written, sid, draw(st.integers(1, 9)))


@settings(deadline=None)
@given(working_sets())
def test_round_trip(ws: WorkingSet) -> None:
    assert decode(ws.encode()) == ws
    assert wsm.is_working_set(ws.encode())


@given(working_sets(), st.data())
@settings(max_examples=200, deadline=None)
def test_truncated_or_corrupt_files_are_rejected(ws: WorkingSet, data: st.DataObject) -> None:
    raw = ws.encode()
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(WorkingSetError):
        decode(raw[:cut])
    with pytest.raises(WorkingSetError, match="trailing data"):
        decode(raw + b"\0")
    i = data.draw(st.integers(0, len(raw) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(raw)
    flipped[i] ^= 1 << bit
    with pytest.raises(WorkingSetError):
        decode(bytes(flipped))


def test_errors_say_what_is_wrong() -> None:
    ws = WorkingSet(4096, 16, (3, 1, 2), frozenset({1}))
    raw = bytearray(ws.encode())
    with pytest.raises(WorkingSetError, match="not a uffd_aio working set"):
        decode(encode_trace(range(16), 4096))
    raw2 = bytearray(raw)
    raw2[8:12] = struct.pack("<I", 2)
    with pytest.raises(WorkingSetError, match="version 2"):
        decode(bytes(raw2))
    with pytest.raises(WorkingSetError, match="checksum"):
        raw[-5] ^= 1
        decode(bytes(raw))
    with pytest.raises(WorkingSetError, match="too short"):
        decode(b"UFFDWSET")


def test_check_names_the_mismatch() -> None:
    ws = WorkingSet(4096, 100, (1, 2), snapshot_id=wsm.id_from_text("a"))
    ws.check(page_size=4096, store_pages=100, snapshot_id=wsm.id_from_text("a"))
    ws.check(page_size=4096, store_pages=100, snapshot_id=NO_ID)  # unknown: not checked
    with pytest.raises(WorkingSetMismatch, match="page size 4096, the memory 2097152"):
        ws.check(page_size=2 << 20)
    with pytest.raises(WorkingSetMismatch, match="snapshot of 100 pages"):
        ws.check(page_size=4096, store_pages=200)
    with pytest.raises(WorkingSetMismatch, match="another snapshot"):
        ws.check(page_size=4096, store_pages=100, snapshot_id=wsm.id_from_text("b"))
    assert issubclass(WorkingSetMismatch, ValueError)


def test_bad_sets_are_refused() -> None:
    with pytest.raises(WorkingSetError, match="twice"):
        WorkingSet(4096, 10, (1, 1))
    with pytest.raises(WorkingSetError, match="outside"):
        WorkingSet(4096, 10, (10,))
    with pytest.raises(WorkingSetError, match="written"):
        WorkingSet(4096, 10, (1,), frozenset({2}))


def test_file_round_trip_and_fingerprint(tmp_path: Path) -> None:
    ws = WorkingSet(4096, 64, (5, 9, 1), frozenset({9}))
    wsm.write(tmp_path / "a.ws", ws)
    assert wsm.read(tmp_path / "a.ws") == ws
    snap = tmp_path / "snap"
    snap.write_bytes(bytes(range(256)) * 64)
    fp = wsm.fingerprint_file(snap)
    assert len(fp) == 16 and fp == wsm.fingerprint_file(snap)
    snap.write_bytes(bytes(16384))
    assert wsm.fingerprint_file(snap) != fp


def test_recorder_bounds() -> None:
    r = WorkingSetRecorder(page_size=4096, store_pages=100, max_pages=3)
    assert r.record(5, write=True) and r.record(5) and r.record(7) and r.record(500)
    assert r.record(1) is True and r.full and r.record(2) is False
    ws = r.result()
    assert ws.order == (5, 7, 1) and ws.written == frozenset({5}) and r.ignored == 1
    t = [0.0]
    r = WorkingSetRecorder(page_size=4096, store_pages=100, max_seconds=1.0,
                           clock=lambda: t[0])
    r.record(1)
    t[0] = 0.5
    r.record(2)
    t[0] = 1.5
    assert r.record(3) is False and r.full and r.result().order == (1, 2)


def test_merge_min_runs_and_rank() -> None:
    a = WorkingSet(4096, 20, (1, 2, 3, 4), frozenset({4}))
    b = WorkingSet(4096, 20, (2, 1, 3, 5))
    c = WorkingSet(4096, 20, (2, 3, 1), frozenset({1}))
    m = merge([a, b, c], min_runs=2)
    # 1: (0 + .25 + 2/3)/3, 2: (.25 + 0 + 0)/3, 3: (.5 + .5 + 1/3)/3; 4 and 5 in one run only
    assert m.order == (2, 1, 3) and m.runs == 3 and m.written == frozenset({1})
    assert merge([a, b, c]).pages == frozenset({1, 2, 3, 4, 5})
    # a page missing from a run counts as its end: 5 (only in b, rank .75) after 4 (.75 too)
    assert merge([a, b]).order[-2:] == (4, 5)
    with pytest.raises(ValueError, match="min_runs"):
        merge([a, b], min_runs=3)
    with pytest.raises(WorkingSetMismatch, match="B was recorded for a snapshot of 30 pages"):
        merge([a, WorkingSet(4096, 30, (1,))], names=["A", "B"])


@settings(deadline=None)
@given(st.lists(working_sets(store_pages=40), min_size=1, max_size=5), st.data())
def test_merge_properties(sets: list[WorkingSet], data: st.DataObject) -> None:
    sets = [WorkingSet(s.page_size, s.store_pages, s.order, s.written) for s in sets]
    k = data.draw(st.integers(1, len(sets)))
    m = merge(sets, min_runs=k)
    counts = {p: sum(p in s for s in sets) for p in range(40)}
    assert m.pages == {p for p, c in counts.items() if c >= k}
    assert merge(sets, min_runs=1).pages == frozenset().union(*(s.pages for s in sets))
    assert merge(sets, min_runs=len(sets)).pages == frozenset.intersection(
        *(s.pages for s in sets))
    assert merge([sets[0]]).order == sets[0].order  # one input keeps its order
    assert m.runs == sum(s.runs for s in sets)
    assert decode(m.encode()) == m


def test_jaccard() -> None:
    a = WorkingSet(4096, 10, (1, 2, 3))
    b = WorkingSet(4096, 10, (2, 3, 4))
    assert wsm.jaccard(a, b) == 0.5 and wsm.jaccard(a, a) == 1.0


@settings(deadline=None)
@given(working_sets(store_pages=200), st.booleans(), st.integers(1, 64), st.integers(1, 16),
       st.frozensets(st.integers(0, 199)))
def test_plan_covers_the_set_first_then_the_rest(ws: WorkingSet, fill: bool, chunk: int,
                                                 max_run: int, resolved: frozenset[int]
                                                 ) -> None:
    bounds = [(0, 50), (60, 200)]
    plan = InstallPlan(ws, bounds, fill=fill, chunk=chunk, max_run=max_run)
    done: set[int] = set(resolved)
    phases: list[str] = []
    for phase, runs in plan.batches(lambda p: p in done):
        phases.append(phase)
        for first, n in runs:
            assert 1 <= n <= max_run
            pages = range(first, first + n)
            assert all(plan.served(p) for p in pages) and not done.intersection(pages)
            if phase == "set":
                assert all(p in ws for p in pages)
            done.update(pages)
    assert phases == sorted(phases, key=lambda ph: ph == "fill")  # the set first
    served = {p for lo, hi in bounds for p in range(lo, hi)}
    want = served if fill else served & ws.pages
    assert want <= done
    assert plan.set_pages == len(ws.pages & served)


def test_plan_set_follows_first_touch_order_by_chunk() -> None:
    ws = WorkingSet(4096, 100, (50, 10, 11, 90, 12, 3))
    plan = InstallPlan(ws, [(0, 100)], chunk=3)
    done: set[int] = set()

    def skip(p: int) -> bool:
        return p in done

    out = []
    for phase, runs in plan.batches(skip):
        out.append((phase, runs))
        done.update(p for f, n in runs for p in range(f, f + n))
    assert out == [("set", [(10, 2), (50, 1)]), ("set", [(3, 1), (12, 1), (90, 1)])]
