"""The sans-io dispatch core with synthetic messages: no kernel, no event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from uffd_aio import dispatch
from uffd_aio.dispatch import (
    BASE_PAGE,
    Channel,
    Dispatcher,
    Fault,
    Outcome,
    cancel_error,
    check_move,
    check_range,
    default_op,
    failure_outcome,
    policy_ops,
    result_op,
)
from uffd_aio.errors import BadHandlerResult, FeatureUnavailable, HandlerTimeout, PagerClosed
from uffd_aio.events import (
    PAGEFAULT_FLAG_MINOR,
    PAGEFAULT_FLAG_WP,
    PAGEFAULT_FLAG_WRITE,
    Fork,
    PageFaultMsg,
    Remap,
    Remove,
    UnknownMsg,
    Unmap,
)
from uffd_aio.modes import Feature
from uffd_aio.ops import Kind, Moved, Op
from uffd_aio.stats import Counters

PS = BASE_PAGE


@attrs.define(eq=False)
class FakeRegion:
    name: str
    address: int
    length: int
    page_size: int = PS
    remote: bool = False
    memfd: int | None = None
    event_handlers: list[Callable[[Any], Any]] = attrs.Factory(list)

    @property
    def end(self) -> int:
        return self.address + self.length

    def address_of(self, offset: int) -> int:
        return self.address + offset


def table(*regions: FakeRegion, features: Feature = Feature(0), local: bool = True
          ) -> Channel:
    ch = Channel(None, features=features, local=local)  # type: ignore[arg-type]
    for r in regions:
        ch.add_extent(r.address, r.end, r, 0)
    return ch


def fault_msg(address: int, flags: int = 0, tid: int = 7) -> PageFaultMsg:
    return PageFaultMsg(address, flags, tid)


A = FakeRegion("a", 0x10_0000, 16 * PS)
B = FakeRegion("b", 0x20_0000, 4 * PS)


def started(core: Dispatcher, ch: Channel, address: int, flags: int = 0) -> Fault:
    f = core.admit(ch, fault_msg(address, flags))
    assert isinstance(f, Fault)
    return f


# ---- admission and dedup -----------------------------------------------------------


def test_fault_is_one_record_with_fields_and_offset() -> None:
    ch = table(A, B, features=Feature.THREAD_ID)
    core = Dispatcher(Counters(), 8)
    f = core.admit(ch, fault_msg(B.address + 2 * PS + 123, PAGEFAULT_FLAG_WRITE, 42), now=5)
    assert isinstance(f, Fault)
    assert (f.address, f.page, f.offset, f.region, f.end) == (
        B.address + 2 * PS + 123, B.address + 2 * PS, 2 * PS, B, B.end)
    assert (f.is_write, f.is_wp, f.is_minor, f.is_missing, f.thread_id) == (
        True, False, False, True, 42)
    assert f.running and core.running == 1 and ch.inflight == {f.page: f}
    assert f.page_address == f.page and "missing write" in repr(f)


def test_thread_id_only_when_negotiated() -> None:
    f = started(Dispatcher(Counters(), 8), table(A), A.address)
    assert f.thread_id is None


def test_duplicates_count_and_finish_frees_the_page() -> None:
    c = Counters()
    ch = table(A)
    core = Dispatcher(c, 8)
    f = started(core, ch, A.address + 5)
    assert core.admit(ch, fault_msg(A.address + 100)) is Outcome.DUPLICATE
    assert core.admit(ch, fault_msg(A.address + PS - 1)) is Outcome.DUPLICATE
    assert f.dups == 2 and c.duplicate_faults == 2 and c.faults == 3
    assert core.finish(f, now=10) and not core.finish(f, now=11)
    assert core.idle and ch.inflight == {} and c.latency.count == 1
    again = started(core, ch, A.address)
    assert again is not f


def test_stray_fault_outside_every_region() -> None:
    c = Counters()
    core = Dispatcher(c, 8)
    assert core.admit(table(A), fault_msg(0x999_0000)) is Outcome.STRAY
    assert c.errors == 1 and core.idle


def test_new_fault_on_a_resolved_page_is_deferred_until_finish() -> None:
    c = Counters()
    ch = table(A)
    core = Dispatcher(c, 8)
    f = started(core, ch, A.address)
    f.resolved = True  # ev.copy() done, the handler runs on
    later = fault_msg(A.address + 8, PAGEFAULT_FLAG_WRITE)
    assert core.admit(ch, later) is Outcome.DEFERRED
    assert f.dups == 0 and c.faults == 2
    core.finish(f)
    assert core.take_deferred(f) == [later] and c.faults == 1  # counted once, re-admitted
    assert core.take_deferred(f) == []
    g = started(core, ch, later.address, later.flags)
    assert g.is_write and c.faults == 2


def test_backlog_past_max_inflight_starts_in_order() -> None:
    ch = table(A)
    core = Dispatcher(Counters(), 2)
    f1, f2 = started(core, ch, A.address), started(core, ch, A.address + PS)
    assert core.admit(ch, fault_msg(A.address + 2 * PS)) is Outcome.QUEUED
    assert core.admit(ch, fault_msg(A.address + 3 * PS)) is Outcome.QUEUED
    assert core.next_ready() is None and not core.idle
    core.finish(f1)
    n3 = core.next_ready()
    assert n3 is not None and n3.page == A.address + 2 * PS and n3.offset == 2 * PS
    assert core.next_ready() is None  # max_inflight again
    core.finish(f2)
    ch.remove_range(A.address + 3 * PS, A.address + 4 * PS)  # unmapped while it waited
    assert core.next_ready() is None and A.address + 3 * PS not in ch.inflight
    core.finish(n3)
    assert core.idle


def test_backlogged_fault_takes_the_extent_at_its_start() -> None:
    ch = table(A)
    core = Dispatcher(Counters(), 1)
    f1 = started(core, ch, A.address)
    assert core.admit(ch, fault_msg(A.address + 4 * PS)) is Outcome.QUEUED
    # the range around it moves before it starts: offset and end follow the new extent
    ch.remove_range(A.address + 4 * PS, A.end)
    ch.add_extent(A.address + 4 * PS, A.address + 6 * PS, A, 4 * PS)
    core.finish(f1)
    f = core.next_ready()
    assert f is not None and f.offset == 4 * PS and f.end == A.address + 6 * PS


@given(st.lists(st.tuples(st.integers(0, 15), st.integers(0, PS - 1), st.booleans()),
                max_size=60),
       st.integers(1, 4))
def test_dedup_invariants(accesses: list[tuple[int, int, bool]], limit: int) -> None:
    """Whatever the interleaving of faults and finishes: one record per page, the
    running count never exceeds max_inflight, and every page is served once."""
    c = Counters()
    ch = table(A)
    core = Dispatcher(c, limit)
    live: list[Fault] = []
    for page, off, finish_one in accesses:
        out = core.admit(ch, fault_msg(A.address + page * PS + off))
        if isinstance(out, Fault):
            live.append(out)
        assert core.running <= limit
        assert len(ch.inflight) == len({f.page for f in ch.inflight.values()})
        if finish_one and live:
            core.finish(live.pop(0))
            while (nxt := core.next_ready()) is not None:
                live.append(nxt)
    while live:
        core.finish(live.pop(0))
        while (nxt := core.next_ready()) is not None:
            live.append(nxt)
    assert core.idle and ch.inflight == {}
    assert c.faults == len(accesses)


# ---- events ---------------------------------------------------------------------------


def test_remap_moves_the_extent_and_names_its_region() -> None:
    c = Counters()
    ch = table(A, B)
    core = Dispatcher(c, 8)
    new = 0x50_0000
    assert core.event(ch, Remap(A.address + 4 * PS, new, 4 * PS)) == [A]
    assert c.remaps == 1 and c.events == 1
    x = ch.lookup(new + PS)
    assert x is not None and x.region is A and x.offset == 4 * PS
    assert ch.lookup(A.address + 4 * PS) is None
    assert ch.lookup(A.address + 8 * PS) is not None  # the rest stays
    f = started(core, ch, new + PS + 3)
    assert f.offset == 5 * PS and f.end == new + 4 * PS


def test_unmap_forgets_and_remove_keeps() -> None:
    c = Counters()
    ch = table(A, B)
    core = Dispatcher(c, 8)
    assert core.event(ch, Remove(A.address, A.address + 2 * PS)) == [A]
    assert ch.lookup(A.address) is not None and c.removes == 1
    assert core.event(ch, Unmap(A.end - PS, B.address + PS)) == [A, B]
    assert ch.lookup(A.end - PS) is None and ch.lookup(B.address) is None
    assert ch.lookup(B.address + PS) is not None and c.unmaps == 1
    assert core.admit(ch, fault_msg(B.address)) is Outcome.STRAY
    # the UNMAP mremap sends after a REMAP matches nothing any more
    assert core.event(ch, Unmap(0x70_0000, 0x71_0000)) == []


def test_remove_region_returns_where_the_region_is_now() -> None:
    """What the pager unregisters and unmaps when a region goes: its extents after
    UNMAP and REMAP, not its original range (which may hold other mappings since)."""
    core = Dispatcher(Counters(), 8)
    ch = table(A, B)
    core.event(ch, Unmap(A.address + 2 * PS, A.address + 4 * PS))
    core.event(ch, Remap(A.address + 8 * PS, 0x50_0000, 8 * PS))
    removed = ch.remove_region(A)
    assert [(x.start, x.end, x.offset) for x in removed] == [
        (A.address, A.address + 2 * PS, 0),
        (A.address + 4 * PS, A.address + 8 * PS, 4 * PS),
        (0x50_0000, 0x50_0000 + 8 * PS, 8 * PS)]
    assert [x.region for x in ch.extents] == [B] and ch.starts == [B.address]
    assert ch.remove_region(A) == []


def test_fork_counts_and_the_child_inherits_the_table() -> None:
    c = Counters()
    parent = table(A, B)
    core = Dispatcher(c, 8)
    assert core.event(parent, Fork(9)) == [] and c.forks == 1
    child = table(local=False)
    child.inherit(parent)
    assert [(x.start, x.end, x.region) for x in child.extents] == [
        (x.start, x.end, x.region) for x in parent.extents]
    f = started(core, child, A.address)  # its own in-flight table: not a duplicate
    g = started(core, parent, A.address)
    assert f is not g and f.channel is child


def test_unknown_event() -> None:
    assert Dispatcher(Counters(), 1).event(table(A), UnknownMsg(0x42, b"")) is None


# ---- outcomes -----------------------------------------------------------------------


def test_default_ops_by_kind() -> None:
    core = Dispatcher(Counters(), 8)
    ch = table(A)
    assert default_op(started(core, ch, A.address)) == Op(Kind.ZERO, A.address, PS)
    assert default_op(started(core, ch, A.address + PS, PAGEFAULT_FLAG_WP)) == Op(
        Kind.UNPROTECT, A.address + PS, PS)
    assert default_op(started(core, ch, A.address + 2 * PS, PAGEFAULT_FLAG_MINOR)) == Op(
        Kind.CONTINUE, A.address + 2 * PS, PS)


@pytest.mark.parametrize(("policy", "wp", "minor", "kinds"), [
    ("poison", False, False, [Kind.POISON, Kind.ZERO]),
    ("raise", False, False, [Kind.POISON, Kind.ZERO]),
    ("zero", False, False, [Kind.ZERO]),
    ("poison", True, False, [Kind.POISON, Kind.UNPROTECT]),
    ("zero", True, False, [Kind.UNPROTECT]),
    ("poison", False, True, [Kind.POISON, Kind.CONTINUE]),
    ("zero", False, True, [Kind.POISON, Kind.CONTINUE]),
])
def test_policy_ops(policy: Any, wp: bool, minor: bool, kinds: list[Kind]) -> None:
    ops = policy_ops(policy, is_wp=wp, is_minor=minor, page=0x3000, size=PS)
    assert [o.kind for o in ops] == kinds
    assert all((o.address, o.length) == (0x3000, PS) for o in ops)


def test_hugetlb_zero_copies_from_a_zero_buffer() -> None:
    (op,) = policy_ops("zero", is_wp=False, is_minor=False, page=0, size=2 << 20)
    assert op.kind is Kind.ZERO and op.data is not None and len(op.data) == 2 << 20


def test_failure_outcomes() -> None:
    def out(policy: Any, **kw: bool) -> tuple[bool, bool, bool, bool]:
        args = {"gone": False, "abandon": False, "resolved": False, "closing": False,
                "failed_before": False} | kw
        o = failure_outcome(policy, **args)
        return o.error, o.policy, o.record, o.stop

    assert out("poison") == (True, True, False, False)
    assert out("zero", resolved=True) == (True, False, False, False)
    assert out("raise") == (True, True, True, True)
    assert out("raise", failed_before=True, closing=True) == (True, True, False, False)
    assert out("raise", gone=True) == (False, True, False, False)  # quiet, still served
    assert out("poison", abandon=True, gone=True) == (False, False, False, False)


def test_cancel_error_says_why() -> None:
    f = started(Dispatcher(Counters(), 1), table(A), A.address)
    assert cancel_error(f, closing=True, timeout=0.5).__class__ is PagerClosed
    assert cancel_error(f, closing=False, timeout=0.5) is None
    f.timed_out = True
    exc = cancel_error(f, closing=True, timeout=0.5)
    assert isinstance(exc, HandlerTimeout) and isinstance(exc, TimeoutError)
    assert "0.5 s" in str(exc)


# ---- handler results: sizes, read-ahead windows, explicit ranges --------------------------


def test_result_op_copies_whole_pages_inside_the_extent() -> None:
    core = Dispatcher(Counters(), 8)
    ch = table(A)
    f = started(core, ch, A.end - 3 * PS)
    op = result_op(f, bytes(3 * PS))  # a read-ahead window up to the region's end
    assert (op.kind, op.address, op.length, op.wp) == (Kind.COPY, f.page, 3 * PS, False)
    with pytest.raises(BadHandlerResult, match="past the end"):
        result_op(f, bytes(4 * PS))
    with pytest.raises(BadHandlerResult, match="multiple of the page size"):
        result_op(f, bytes(PS + 1))
    with pytest.raises(BadHandlerResult, match="multiple of the page size"):
        result_op(f, b"")
    with pytest.raises(BadHandlerResult, match="expected a bytes-like"):
        result_op(f, 42)
    wp = started(core, ch, A.address, PAGEFAULT_FLAG_WP)
    with pytest.raises(BadHandlerResult, match="write-protect"):
        result_op(wp, bytes(PS))


@given(st.integers(0, 15), st.integers(1, 20))
def test_read_ahead_window_fits_or_is_refused(page: int, pages: int) -> None:
    f = started(Dispatcher(Counters(), 1), table(A), A.address + page * PS)
    if page + pages <= 16:
        assert result_op(f, bytes(pages * PS)).length == pages * PS
    else:
        with pytest.raises(BadHandlerResult):
            result_op(f, bytes(pages * PS))


def test_result_of_a_suspended_handler_checks_the_current_extent() -> None:
    ch = table(A)
    f = started(Dispatcher(Counters(), 1), ch, A.address)
    f.task = object()  # type: ignore[assignment]  # it suspended: the table may have changed
    ch.remove_range(A.address + PS, A.end)
    with pytest.raises(BadHandlerResult, match="past the end"):
        result_op(f, bytes(2 * PS))


def test_check_range_and_move() -> None:
    ch = table(A, features=Feature.MOVE)
    f = started(Dispatcher(Counters(), 1), ch, A.address)
    check_range(f, A.address, 16 * PS, what="zero")
    with pytest.raises(BadHandlerResult, match="outside"):
        check_range(f, A.address, 17 * PS, what="zero")
    with pytest.raises(BadHandlerResult, match="multiples"):
        check_range(f, A.address + 1, PS, what="zero")
    check_move(f, A.address, PS, Moved(0x90_0000))
    with pytest.raises(BadHandlerResult, match="overlaps"):
        check_move(f, A.address, 2 * PS, Moved(A.address + PS))
    with pytest.raises(BadHandlerResult, match="page-aligned"):
        check_move(f, A.address, PS, Moved(0x90_0001))
    no_move = table(A)
    with pytest.raises(FeatureUnavailable):
        check_move(started(Dispatcher(Counters(), 1), no_move, A.address), A.address, PS,
                   Moved(0x90_0000))
    child = table(A, features=Feature.MOVE, local=False)
    with pytest.raises(BadHandlerResult, match="another process"):
        check_move(started(Dispatcher(Counters(), 1), child, A.address), A.address, PS,
                   Moved(0x90_0000))
    op = dispatch.moved_op(f, Moved(0x90_0000, 2 * PS))
    assert (op.kind, op.address, op.length) == (Kind.MOVE, A.address, 2 * PS)
