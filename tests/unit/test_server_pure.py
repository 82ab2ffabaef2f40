"""Pure helpers of uffd_aio.server: the removed-range set and size parsing."""

from __future__ import annotations

import argparse
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uffd_aio.server import _Ranges, parse_size


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 30)), max_size=30))
def test_ranges_match_a_set_model(adds: list[tuple[int, int]]) -> None:
    r = _Ranges()
    model: set[int] = set()
    for start, n in adds:
        r.add(start, start + n)
        model.update(range(start, start + n))
    for x in range(0, 240):
        assert (x in r) == (x in model), x
    spans = list(r)
    assert spans == sorted(spans)
    for (_, e1), (s2, _) in itertools.pairwise(spans):
        assert e1 < s2  # disjoint and not touching (adjacent ranges merge)
    assert bool(r) == bool(adds)


@pytest.mark.parametrize("text, value", [("4096", 4096), ("64M", 64 << 20), ("1g", 1 << 30),
                                         ("2TiB", 2 << 40), ("16k", 16 << 10),
                                         ("8MB", 8 << 20)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "-1", "0", "1.5G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


@pytest.mark.parametrize("kw", [{"max_clients": 0}, {"max_pending": 0}])
def test_client_limits_must_be_positive(kw: dict[str, int]) -> None:
    from uffd_aio.server import HandoffServer
    from uffd_aio.stores.zero import ZeroBackend

    with pytest.raises(ValueError, match="at least 1"):
        HandoffServer("/nonexistent/uffd.sock", ZeroBackend(), **kw)


def test_serve_command_has_the_pending_limit() -> None:
    from uffd_aio.cli import build_parser

    args = build_parser().parse_args(["serve", "--socket", "s", "--backend", "zero"])
    assert (args.max_clients, args.max_pending) == (1024, 128)
    args = build_parser().parse_args(["soak", "--faults", "1000000"])
    assert args.faults == 1_000_000 and args.duration is None
