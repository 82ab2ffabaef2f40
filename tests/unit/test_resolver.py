"""The resolver against a stub backend and a stub loop: batching, the lone fault, EAGAIN
retries, explicit resolutions and the error policy, without a kernel."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest

from uffd_aio.dispatch import BASE_PAGE, Channel, Dispatcher, Fault
from uffd_aio.errors import ResolveError
from uffd_aio.events import PAGEFAULT_FLAG_WP, PageFaultMsg
from uffd_aio.ops import Kind, Op
from uffd_aio.resolver import Resolver
from uffd_aio.stats import Counters
from uffd_aio.uffd import MmChanging, RangeGone

from .test_dispatch import FakeRegion

PS = BASE_PAGE
R = FakeRegion("r", 0x40_0000, 32 * PS)


class StubUffd:
    fd = -1
    closed = False

    def __init__(self) -> None:
        self.woken: list[tuple[int, int]] = []

    def wake(self, address: int, length: int) -> None:
        self.woken.append((address, length))


class StubBackend:
    """Records what it executes; ``fail`` maps a kind to the exceptions to raise next."""

    name = "stub"

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.fail: dict[Kind, list[BaseException]] = {}

    def execute(self, uffd: Any, op: Op) -> int:
        queued = self.fail.get(op.kind)
        if queued:
            raise queued.pop(0)
        self.ops.append(op)
        return op.length


class StubLoop:
    def __init__(self) -> None:
        self.later: list[tuple[float, Callable[..., Any], tuple[Any, ...]]] = []
        self.soon: list[Callable[[], Any]] = []

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.later.append((delay, fn, args))

    def call_soon(self, fn: Callable[[], Any]) -> None:
        self.soon.append(fn)


class Rig:
    def __init__(self, policy: Any = "poison") -> None:
        self.counters = Counters()
        self.core = Dispatcher(self.counters, 64)
        self.finished: list[Fault] = []
        self.failed: list[tuple[Fault, BaseException]] = []
        self.resolver = Resolver(self.counters, policy, finish=self.finish, fail=self.fail)
        self.backend = StubBackend()
        self.loop = StubLoop()
        self.resolver.use(self.backend, self.loop, None)  # type: ignore[arg-type]
        self.uffd = StubUffd()
        self.channel = Channel(self.uffd, resolver=self.resolver)  # type: ignore[arg-type]
        self.channel.add_extent(R.address, R.end, R, 0)

    def finish(self, f: Fault) -> None:
        self.core.finish(f)
        self.finished.append(f)

    def fail(self, f: Fault, exc: BaseException) -> None:
        self.failed.append((f, exc))
        self.core.finish(f)

    def fault(self, page: int, flags: int = 0) -> Fault:
        f = self.core.admit(self.channel, PageFaultMsg(R.address + page * PS, flags, 0))
        assert isinstance(f, Fault)
        return f


def test_lone_fault_resolves_at_once() -> None:
    rig = Rig()
    r = rig.resolver
    r.solo = r.in_batch = True
    f = rig.fault(3)
    r.complete(f, bytes(PS))
    assert [(o.kind, o.address) for o in rig.backend.ops] == [(Kind.COPY, f.page)]
    assert rig.finished == [f] and r.pending == []
    assert (rig.counters.copies, rig.counters.resolved_pages) == (1, 1)


def test_batch_merges_neighbours_and_wakes_every_owner() -> None:
    rig = Rig()
    r = rig.resolver
    r.in_batch = True
    faults = [rig.fault(p) for p in (5, 4, 6, 9)]
    for f in faults[:3]:
        r.complete(f, bytes(PS))
    r.complete(faults[3], None)  # a zero page, not merged with the copies
    assert rig.backend.ops == [] and len(r.pending) == 4
    r.in_batch = False
    r.flush()
    assert [(o.kind, o.address, o.length) for o in rig.backend.ops] == [
        (Kind.COPY, R.address + 4 * PS, 3 * PS), (Kind.ZERO, R.address + 9 * PS, PS)]
    assert set(map(id, rig.finished)) == set(map(id, faults))
    assert rig.core.idle


def test_outside_a_batch_the_flush_is_scheduled_once() -> None:
    rig = Rig()
    r = rig.resolver
    a, b = rig.fault(0), rig.fault(1)
    r.complete(a, None)
    r.complete(b, None)
    assert len(rig.loop.soon) == 1 and rig.backend.ops == []
    rig.loop.soon.pop()()
    assert [(o.kind, o.length) for o in rig.backend.ops] == [(Kind.ZERO, 2 * PS)]


def test_eagain_is_retried_later_then_resolved() -> None:
    rig = Rig()
    r = rig.resolver
    r.solo = True
    rig.backend.fail[Kind.COPY] = [MmChanging(op="copy", address=R.address, length=PS, done=0)]
    f = rig.fault(0)
    r.complete(f, bytes(PS))
    assert rig.finished == [] and f.attempts == 1 and rig.counters.eagain_retries == 1
    (delay, fn, args), = rig.loop.later
    assert delay > 0
    fn(*args)
    assert rig.finished == [f] and rig.backend.ops[0].kind is Kind.COPY


def test_range_gone_finishes_quietly() -> None:
    rig = Rig()
    rig.resolver.solo = True
    rig.backend.fail[Kind.ZERO] = [RangeGone(errno.ENOENT, "gone", op="zero",
                                             address=R.address, length=PS)]
    f = rig.fault(0)
    rig.resolver.complete(f, None)
    assert rig.finished == [f] and rig.failed == []


def test_resolve_error_meets_the_policy_through_fail() -> None:
    rig = Rig()
    rig.resolver.solo = True
    err = ResolveError(errno.EFAULT, "bad", op="copy", address=R.address, length=PS)
    rig.backend.fail[Kind.COPY] = [err]
    f = rig.fault(0)
    rig.resolver.complete(f, bytes(PS))
    assert rig.failed == [(f, err)]


def test_bad_result_fails_the_fault() -> None:
    rig = Rig()
    f = rig.fault(0, PAGEFAULT_FLAG_WP)
    rig.resolver.complete(f, bytes(PS))
    assert rig.failed and rig.failed[0][0] is f and rig.backend.ops == []


def test_explicit_resolution_marks_the_fault() -> None:
    rig = Rig()
    f = rig.fault(2)
    n = rig.resolver.explicit(f, Op(Kind.ZERO, f.page, 2 * PS))
    assert n == 2 * PS and f.resolved and rig.counters.resolved_pages == 1
    rig.resolver.complete(f, None)  # the handler returns afterwards: nothing more to do
    assert rig.finished == [f] and len(rig.backend.ops) == 1


@pytest.mark.parametrize(("policy", "refuse", "kinds"), [
    ("poison", [], [Kind.POISON]),
    ("poison", [Kind.POISON], [Kind.ZERO]),  # no UFFDIO_POISON: a zero page
    ("zero", [], [Kind.ZERO]),
])
def test_policy_takes_the_first_step_that_works(policy: Any, refuse: list[Kind],
                                                kinds: list[Kind]) -> None:
    rig = Rig(policy)
    for k in refuse:
        rig.backend.fail[k] = [ResolveError(errno.EINVAL, "no", op=k.value, address=0,
                                            length=PS)]
    rig.resolver.apply_policy(rig.channel, False, False, R.address, PS)
    assert [o.kind for o in rig.backend.ops] == kinds and rig.uffd.woken == []


def test_policy_wakes_as_a_last_resort_and_not_when_abandoned() -> None:
    rig = Rig()
    no = ResolveError(errno.EINVAL, "no", op="x", address=0, length=PS)
    rig.backend.fail = {Kind.POISON: [no], Kind.ZERO: [no]}
    rig.resolver.apply_policy(rig.channel, False, False, R.address, PS)
    assert rig.uffd.woken == [(R.address, PS)]
    rig.resolver.abandon = True
    rig.resolver.apply_policy(rig.channel, False, False, R.address, PS)
    assert rig.uffd.woken == [(R.address, PS)] and rig.backend.ops == []
