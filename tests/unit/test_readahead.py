"""Read-ahead policies, the trace format and the replay plan (pure: no kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uffd_aio.serving.readahead import (
    AdaptiveWindow,
    FaultRecorder,
    FixedWindow,
    NoReadahead,
    ReadaheadPolicy,
    ReplayPlan,
    decode_trace,
    encode_trace,
    policy_from,
    read_trace,
)


def test_fixed_and_none() -> None:
    assert NoReadahead().window(7) == 1
    assert FixedWindow(16).window(0) == 16
    with pytest.raises(ValueError):
        FixedWindow(0)


def test_adaptive_grows_on_sequential_hits_and_is_bounded() -> None:
    p = AdaptiveWindow(1, 32)
    page, sizes = 0, []
    for _ in range(10):
        n = p.window(page)
        sizes.append(n)
        page += n  # the next sequential fault lands right after the window
    assert sizes == [1, 2, 4, 8, 16, 32, 32, 32, 32, 32]
    assert p.hits == 9 and p.resets == 1


def test_adaptive_resets_on_random_access() -> None:
    p = AdaptiveWindow(2, 64)
    assert p.window(0) == 2
    assert p.window(2) == 4
    assert p.window(6) == 8
    assert p.window(1000) == 2  # random: a new stream at the minimum
    assert p.window(5000) == 2
    assert p.resets == 3


def test_adaptive_fault_inside_last_window_continues_the_stream() -> None:
    p = AdaptiveWindow(1, 64)
    assert [p.window(0), p.window(1), p.window(3)] == [1, 2, 4]  # next expected: 7
    assert p.window(5) == 8  # the window [3, 7) was clipped at 5: still sequential
    assert p.window(13) == 16  # [5, 13) -> 13
    assert p.window(12) == 1  # before the last window's end but not inside: new stream
    assert p.resets == 2


def test_adaptive_tracks_interleaved_streams() -> None:
    p = AdaptiveWindow(1, 16, streams=4)
    a, b = 0, 10_000
    for _ in range(4):
        a += p.window(a)
        b += p.window(b)
    # both streams grew independently: 1, 2, 4, 8 pages each
    assert a == 15 and b == 10_015
    assert p.window(a) == 16 and p.window(b) == 16


def test_adaptive_stream_table_is_bounded() -> None:
    p = AdaptiveWindow(1, 8, streams=3)
    for i in range(100):
        p.window(i * 1000)
    assert p.streams == 3
    # the oldest streams were dropped: a sequential fault there is a reset
    assert p.window(1) == 1
    assert p.window(99_001) == 2


@given(st.lists(st.integers(0, 1 << 40), max_size=200), st.integers(1, 64))
def test_adaptive_window_always_in_bounds(pages: list[int], mx: int) -> None:
    p = AdaptiveWindow(1, mx, streams=8)
    for page in pages:
        assert 1 <= p.window(page) <= mx
    assert p.streams <= 8


def test_policy_from() -> None:
    assert isinstance(policy_from(None), NoReadahead)
    assert isinstance(policy_from(0), NoReadahead)
    assert isinstance(policy_from(1), NoReadahead)
    f = policy_from(8)
    assert isinstance(f, FixedWindow) and f.pages == 8
    assert isinstance(policy_from("off"), NoReadahead)
    g = policy_from("fixed:4")
    assert isinstance(g, FixedWindow) and g.pages == 4
    a = policy_from("adaptive:128")
    assert isinstance(a, AdaptiveWindow) and a.max_pages == 128
    assert isinstance(policy_from("adaptive"), AdaptiveWindow)
    obj = AdaptiveWindow()
    assert policy_from(obj) is obj
    assert isinstance(obj, ReadaheadPolicy)
    with pytest.raises(ValueError):
        policy_from("sideways")
    with pytest.raises(ValueError):
        policy_from(-1)
    with pytest.raises(TypeError):
        policy_from(True)


@given(st.lists(st.integers(0, (1 << 64) - 1), max_size=300),
       st.sampled_from([4096, 2 << 20, 1 << 30]))
def test_trace_roundtrip(pages: list[int], ps: int) -> None:
    assert decode_trace(encode_trace(pages, ps)) == (ps, pages)


def test_trace_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="short"):
        decode_trace(b"UFF")
    with pytest.raises(ValueError, match="magic"):
        decode_trace(b"NOTATRACE" + bytes(16))
    with pytest.raises(ValueError, match="u64"):
        decode_trace(encode_trace([1], 4096) + b"\x01")
    with pytest.raises(ValueError, match="power of two"):
        decode_trace(encode_trace([], 3000))


def test_recorder_keeps_first_fault_order(tmp_path: Path) -> None:
    path = tmp_path / "trace"
    r = FaultRecorder(path, page_size=4096)
    for p in (5, 3, 5, 9, 3, 4):
        r.record(p)
    r.record_range(8, 3)  # 8, (9 again), 10
    assert r.order == [5, 3, 9, 4, 8, 10] and len(r) == 6
    r.save()
    assert read_trace(path) == (4096, [5, 3, 9, 4, 8, 10])
    assert not list(tmp_path.glob("*.tmp*"))


def test_replay_plan_batches_runs_and_skips_present() -> None:
    order = [10, 11, 12, 13, 2, 3, 50, 51, 52, 7]
    present = {12, 51}
    plan = ReplayPlan(order, batch=3)
    got = []
    while (b := plan.next_batch(lambda p: p in present)) is not None:
        got.append(b)
    assert got == [(10, 2), (13, 1), (2, 2), (50, 1), (52, 1), (7, 1)]
    assert plan.done and plan.remaining == 0 and plan.skipped == 2


def test_replay_plan_batch_limit_and_bounds() -> None:
    plan = ReplayPlan([*range(100, 110), 5, 500], batch=4, lo=100, hi=200)
    got = []
    while (b := plan.next_batch(lambda p: False)) is not None:
        got.append(b)
    assert got == [(100, 4), (104, 4), (108, 2)]
    assert plan.skipped == 2


def test_replay_plan_sees_pages_become_present_meanwhile() -> None:
    present: set[int] = set()
    plan = ReplayPlan([1, 2, 3, 4], batch=1)
    assert plan.next_batch(present.__contains__) == (1, 1)
    present.update({2, 3})  # faults brought these in meanwhile
    assert plan.next_batch(present.__contains__) == (4, 1)
    assert plan.next_batch(present.__contains__) is None
