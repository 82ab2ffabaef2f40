"""The Firecracker handoff payload: parsing and validation, without sockets or a kernel."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uffd_aio.handoff_proto import (
    HandoffError,
    Mapping,
    parse_mappings,
    payload_incomplete,
)

PS = 4096
BASE = 0x7F00_0000_0000


def entry(base: int = BASE, size: int = 16 * PS, offset: int = 0, **kw: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"base_host_virt_addr": base, "size": size, "offset": offset,
                         "page_size": PS, "page_size_kib": PS}
    e.update(kw)
    return {k: v for k, v in e.items() if v is not None}


def dumps(*entries: Any) -> bytes:
    return json.dumps(list(entries)).encode()


def bad(payload: bytes, match: str, **kw: Any) -> None:
    with pytest.raises(HandoffError, match=match):
        parse_mappings(payload, **kw)


def test_firecracker_message_parses() -> None:
    payload = dumps(entry(BASE + 64 * PS, 8 * PS, 16 * PS), entry(BASE, 16 * PS, 0))
    maps = parse_mappings(payload)
    assert maps == (Mapping(BASE, 16 * PS, 0, PS), Mapping(BASE + 64 * PS, 8 * PS, 16 * PS, PS))
    assert maps[1].store_offset(BASE + 64 * PS + 5 * PS + 7) == 16 * PS + 5 * PS + 7
    with pytest.raises(ValueError, match="outside"):
        maps[0].store_offset(BASE + 16 * PS)


def test_nul_terminated_and_whitespace_payloads() -> None:
    assert len(parse_mappings(dumps(entry()) + b"\x00")) == 1
    assert len(parse_mappings(b"  \n" + dumps(entry()) + b"\n")) == 1


def test_page_size_alone_and_legacy_alone() -> None:
    assert parse_mappings(dumps(entry(page_size_kib=None)))[0].page_size == PS
    # the legacy field holds bytes despite its name
    assert parse_mappings(dumps(entry(page_size=None)))[0].page_size == PS
    huge = 2 << 20
    m = parse_mappings(dumps(entry(size=huge * 2, page_size=None, page_size_kib=huge)))[0]
    assert m.page_size == huge


def test_legacy_page_size_in_kib_is_explained() -> None:
    bad(dumps(entry(page_size=None, page_size_kib=4)), "holds bytes despite its name")


def test_page_sizes_that_disagree() -> None:
    bad(dumps(entry(page_size=PS, page_size_kib=2 << 20)), "disagree")


def test_missing_page_size() -> None:
    bad(dumps(entry(page_size=None, page_size_kib=None)), "missing field 'page_size'")


@pytest.mark.parametrize("ps", [0, 1000, 4095, 6144, 2 << 30])
def test_bad_page_sizes(ps: int) -> None:
    bad(dumps(entry(page_size=ps, page_size_kib=None)), "not a power of two")


@pytest.mark.parametrize("payload, match", [
    (b"", "empty payload"),
    (b"\x00\x00", "empty payload"),
    (b"\xff\xfe[]", "not UTF-8"),
    (b"[{", "invalid JSON"),
    (b"[1,]", "invalid JSON"),
    (b"not json", "invalid JSON"),
    (b"[]", "empty"),
    (b"{}", "expected a JSON array"),
    (b'"x"', "expected a JSON array"),
    (b"[1]", "mapping 0: expected a JSON object"),
    (b"[" * 100000 + b"]" * 100000, "invalid JSON|nested too deeply|expected a JSON object"),
])
def test_invalid_documents(payload: bytes, match: str) -> None:
    bad(payload, match)


@pytest.mark.parametrize("field", ["base_host_virt_addr", "size", "offset"])
def test_missing_fields(field: str) -> None:
    e = entry()
    del e[field]
    bad(dumps(entry(BASE + 32 * PS), e), f"mapping 1: missing field '{field}'")


@pytest.mark.parametrize("value", ["4096", 4096.0, True, None, [4096], {"v": 1}])
def test_mistyped_fields(value: Any) -> None:
    bad(dumps(entry(size=value) if value is not None else {**entry(), "size": None}),
        "field 'size' must be an integer")


def test_negative_fields() -> None:
    bad(dumps(entry(offset=-PS)), "must not be negative")


@pytest.mark.parametrize("kw", [{"base": BASE + 1}, {"size": PS + 1}, {"offset": 512}])
def test_unaligned(kw: dict[str, int]) -> None:
    bad(dumps(entry(**kw)), "multiples of the page size")


def test_unaligned_for_huge_pages() -> None:
    huge = 2 << 20
    bad(dumps(entry(BASE + PS, size=huge, page_size=huge, page_size_kib=huge)),
        "multiples of the page size")


def test_zero_size() -> None:
    bad(dumps(entry(size=0)), "size is 0")


def test_absurd_sizes() -> None:
    bad(dumps(entry(size=1 << 50)), "exceeds the limit")
    bad(dumps(entry(base=0)), "not a user-space address range")
    bad(dumps(entry(base=(1 << 57) - PS, size=2 * PS)), "not a user-space address range")
    bad(dumps(entry(offset=1 << 63)), "absurd")
    bad(dumps(entry(size=1 << 20)), "exceeds the limit", max_total=1 << 19)


def test_total_over_the_limit() -> None:
    payload = dumps(*(entry(BASE + i * 32 * PS, 16 * PS) for i in range(4)))
    bad(payload, "total", max_total=63 * PS)
    assert len(parse_mappings(payload, max_total=64 * PS)) == 4


def test_absurd_counts() -> None:
    payload = dumps(*(entry(BASE + i * 2 * PS, PS) for i in range(300)))
    bad(payload, "300 mappings exceed the limit of 256")
    assert len(parse_mappings(payload, max_mappings=300)) == 300


@pytest.mark.parametrize("second", [BASE, BASE + 15 * PS, BASE - PS])
def test_overlapping(second: int) -> None:
    bad(dumps(entry(BASE, 16 * PS), entry(second, 2 * PS)), "overlaps")


def test_adjacent_is_fine() -> None:
    assert len(parse_mappings(dumps(entry(BASE, 16 * PS), entry(BASE + 16 * PS, PS)))) == 2


def test_unknown_fields_are_ignored() -> None:
    assert len(parse_mappings(dumps(entry(future_field="x")))) == 1


def test_payload_incomplete() -> None:
    full = dumps(entry(), entry(BASE + 64 * PS))
    assert not payload_incomplete(full)
    assert not payload_incomplete(full + b"\x00")
    assert payload_incomplete(full[:10])
    assert not payload_incomplete(b"garbage")


_maps = st.lists(
    st.tuples(st.integers(1, 1 << 20), st.integers(1, 64), st.integers(0, 1 << 20)),
    min_size=1, max_size=20)


@given(_maps)
def test_roundtrip_or_clear_error(raw: list[tuple[int, int, int]]) -> None:
    entries = [entry(b * PS, n * PS, o * PS) for b, n, o in raw]
    try:
        maps = parse_mappings(dumps(*entries))
    except HandoffError as exc:
        assert "overlaps" in str(exc)
        return
    assert sorted((m.base_host_virt_addr, m.size, m.offset) for m in maps) == sorted(
        (e["base_host_virt_addr"], e["size"], e["offset"]) for e in entries)
    for a, b in itertools.pairwise(maps):
        assert a.end <= b.base_host_virt_addr


# ---- robustness: every bad payload is a HandoffError, nothing else (issue 11, bug 5) ----


@pytest.mark.parametrize("digits", [25, 4301, 5000, 60000])
def test_huge_integers_are_a_clear_error(digits: int) -> None:
    # Python refuses to convert more than 4300 decimal digits (a ValueError from json.loads)
    number = b"9" * digits
    bad(b'[{"base_host_virt_addr": ' + number + b', "size": 4096, "offset": 0, '
        b'"page_size": 4096}]', f"integer of {digits} digits")
    bad(b"[" + number + b"]", f"integer of {digits} digits")


@pytest.mark.parametrize("payload", [
    b'[{"size": 1e999}]', b'[{"size": NaN}]', b'[{"size": -Infinity}]', b"[1e400]",
    b'[{"base_host_virt_addr": -' + b"1" * 4000 + b"}]",
    b'["' + b"\\ud800" * 10 + b'"]', b'[{"\\u0000": 1}]', b"\x00[]",
])
def test_odd_json_is_a_clear_error(payload: bytes) -> None:
    with pytest.raises(HandoffError):
        parse_mappings(payload)


def _parse_or_reject(payload: bytes) -> None:
    try:
        maps = parse_mappings(payload)
    except HandoffError as exc:
        assert str(exc) and len(str(exc)) < 1000  # a readable message, not the payload
        return
    assert maps and all(isinstance(m, Mapping) for m in maps)


_json = st.recursive(
    st.none() | st.booleans() | st.floats() | st.text(max_size=20)
    | st.integers() | st.integers(min_value=-(10**6000), max_value=10**6000),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.sampled_from(["base_host_virt_addr", "size", "offset", "page_size",
                                       "page_size_kib", "x"]) | st.text(max_size=5),
                      inner, max_size=6),
    max_leaves=20)


@given(st.binary(max_size=300))
def test_fuzz_bytes(payload: bytes) -> None:
    _parse_or_reject(payload)


@given(_json)
def test_fuzz_json(doc: Any) -> None:
    try:
        text = json.dumps(doc)
    except ValueError:  # an integer Python itself will not print
        text = "[" + "9" * 5000 + "]"
    _parse_or_reject(text.encode())
    _parse_or_reject(text.encode()[: len(text) // 2])


_field = st.one_of(st.integers(-(1 << 70), 1 << 70), st.integers(0, 64).map(lambda n: n * PS),
                   st.sampled_from([PS, 2 << 20, 1 << 30, 0, -1, True, 4096.0, "4096", None]))


@given(st.lists(st.fixed_dictionaries({}, optional={
    "base_host_virt_addr": _field, "size": _field, "offset": _field, "page_size": _field,
    "page_size_kib": _field}), min_size=0, max_size=5))
def test_fuzz_mapping_objects(entries: list[dict[str, Any]]) -> None:
    _parse_or_reject(json.dumps(entries).encode())
