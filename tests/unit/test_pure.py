"""Pure layers: resolution merging, stats, feature names, the pattern."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uffd_aio import modes, testing
from uffd_aio.errors import MoveError
from uffd_aio.resolve import Kind, Moved, Op, covering, merge
from uffd_aio.stats import Counters, Histogram

PS = 4096


def test_merge_contiguous_copies_and_zeros() -> None:
    a = Op(Kind.COPY, 0x1000, PS, b"a" * PS)
    b = Op(Kind.COPY, 0x2000, PS, b"b" * PS)
    z1 = Op(Kind.ZERO, 0x5000, PS)
    z2 = Op(Kind.ZERO, 0x4000, PS)
    far = Op(Kind.COPY, 0x9000, PS, b"c" * PS)
    out = merge([far, b, z1, a, z2])
    assert [(o.kind, o.address, o.length) for o in out] == [
        (Kind.COPY, 0x1000, 2 * PS), (Kind.ZERO, 0x4000, 2 * PS), (Kind.COPY, 0x9000, PS)]
    assert bytes(out[0].data) == b"a" * PS + b"b" * PS


def test_merge_keeps_kinds_and_wp_apart() -> None:
    out = merge([Op(Kind.COPY, 0, PS, b"x" * PS), Op(Kind.COPY, PS, PS, b"y" * PS, wp=True),
                 Op(Kind.ZERO, 2 * PS, PS)])
    assert len(out) == 3


def test_merge_never_merges_moves() -> None:
    a = Op(Kind.MOVE, 0, PS, Moved(0x10000))
    b = Op(Kind.MOVE, PS, PS, Moved(0x90000))  # touching, but another source
    inner = Op(Kind.MOVE, 0, PS, Moved(0x20000))  # same page: kept, the kernel says EEXIST
    assert merge([b, inner, a]) == [inner, a, b]  # sorted (stably), nothing merged
    assert len(merge([a, b, Op(Kind.ZERO, 2 * PS, PS)])) == 3


def test_op_buffer_is_the_data_to_copy() -> None:
    data = b"x" * PS
    assert Op(Kind.COPY, 0, PS, data).buffer is data
    zeros = memoryview(bytes(PS))  # ZERO on hugetlbfs: a zero buffer to copy from
    assert Op(Kind.ZERO, 0, PS, zeros).buffer is zeros
    assert Op(Kind.ZERO, 0, PS).buffer is None
    assert Op(Kind.MOVE, 0, PS, Moved(0x10000)).buffer is None  # a Moved is no buffer


def test_move_error_explains_errno() -> None:
    import errno

    e = MoveError(errno.EBUSY, "Device or resource busy", op="UFFDIO_MOVE", address=0x1000,
                  length=PS, src=0x5000, done=0)
    assert e.errno == errno.EBUSY and e.src == 0x5000 and e.done == 0
    assert "source 0x5000" in str(e) and "MADV_DONTFORK" in str(e)
    assert "allow_src_holes" in str(MoveError(errno.ENOENT, "x", op="m", address=0, length=PS,
                                              src=0))
    assert str(MoveError(errno.EPERM, "x", op="m", address=0, length=PS, src=0)).endswith(
        "x (source 0x0)")


def test_merge_overlapping_read_ahead() -> None:
    big = Op(Kind.COPY, 0, 4 * PS, b"1" * (4 * PS))
    inner = Op(Kind.COPY, PS, PS, b"2" * PS)
    tail = Op(Kind.COPY, 3 * PS, 2 * PS, b"3" * (2 * PS))
    (m,) = merge([inner, tail, big])
    assert m.length == 5 * PS
    assert bytes(m.data) == b"1" * (4 * PS) + b"3" * PS


@given(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 4)), max_size=40))
def test_merge_covers_exactly_the_inputs(spans: list[tuple[int, int]]) -> None:
    ops = [Op(Kind.ZERO, p * PS, n * PS) for p, n in spans]
    out = merge(ops)
    covered = {a for o in out for a in range(o.address, o.end, PS)}
    wanted = {a for o in ops for a in range(o.address, o.end, PS)}
    assert covered == wanted
    assert all(x.end < y.address for x, y in itertools.pairwise(out))
    for o in ops:
        m = covering(out, o.address)
        assert m is not None and m.address <= o.address and o.end <= m.end


def test_histogram_percentiles() -> None:
    h = Histogram()
    for ns in [1000] * 90 + [1_000_000] * 10:
        h.record(ns)
    s = h.snapshot()
    assert s.count == 100
    assert 0.5 < s.p50_us < 2.0
    assert 500 < s.p99_us < 2000
    assert s.max_us == 1000.0


def test_counters_snapshot_is_frozen() -> None:
    c = Counters()
    c.faults = 3
    snap = c.snapshot(inflight=1, backlog=2, backend="ioctl")
    assert (snap.faults, snap.inflight, snap.backlog, snap.backend) == (3, 1, 2, "ioctl")
    with pytest.raises(AttributeError):
        snap.faults = 4  # type: ignore[misc]


def test_feature_names() -> None:
    f = modes.Feature.EVENT_FORK | modes.Feature.POLL | (1 << 40)
    assert modes.feature_names(f) == ["EVENT_FORK", "POLL", "bit40"]


def test_pattern_matches_the_documented_formula() -> None:
    data = testing.pattern_bytes(4096, 64)
    for i in range(8):
        (word,) = struct.unpack_from("<Q", data, 8 * i)
        o = 4096 + 8 * i
        assert word == ((o // 8) * 0x9E3779B97F4A7C15 % 2**64) ^ testing.DEFAULT_SEED
        assert word == testing.pattern_word(o)


def test_fill_sync_writes_the_pattern() -> None:
    from uffd_aio.testing import _lowlevel as tll

    buf = bytearray(2 * PS)
    addr, keep = tll.buffer_address(buf, writable=True)
    testing.fill_sync(addr + PS, PS, offset=PS)
    del keep
    assert buf[:PS] == bytes(PS)
    assert buf[PS:] == testing.pattern_bytes(PS, PS)
    addr, keep = tll.buffer_address(buf, writable=True)
    assert testing.verify_sync(addr + PS, PS, PS) == -1
    assert testing.verify_sync(addr, PS) == 0  # zeros: the first word is wrong
    del keep


def test_pattern_rejects_unaligned() -> None:
    with pytest.raises(ValueError):
        testing.pattern_bytes(3, 8)
