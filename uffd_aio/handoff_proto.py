"""The Firecracker uffd handoff message, parsed and validated (pure: no I/O, no kernel).

A VMM that restores a snapshot with a userfaultfd backend connects to the
page server's Unix socket and sends ONE message: the uffd as SCM_RIGHTS
ancillary data and, as the payload, a JSON array with one object per guest
memory region::

    [{"base_host_virt_addr": 140..., "size": 134217728, "offset": 0,
      "page_size": 4096, "page_size_kib": 4096}]

``page_size_kib`` is Firecracker's legacy name and, despite the name, holds
BYTES.  Either field may be present; when both are, they must agree.

:func:`parse_mappings` turns the payload into :class:`Mapping` records or
raises :class:`HandoffError` with a message that names the offending entry
and field.  Everything the server later trusts (alignment, no overlap, sane
sizes and counts, no address overflow) is checked here.
"""

from __future__ import annotations

import itertools
import json
from typing import Final

import attrs

#: generous defaults; the server exposes them as options
DEFAULT_MAX_MAPPINGS: Final = 256
DEFAULT_MAX_TOTAL: Final = 1 << 40  # 1 TiB of guest memory per client
DEFAULT_MAX_PAYLOAD: Final = 1 << 16  # bytes of JSON

MIN_PAGE_SIZE: Final = 4096
MAX_PAGE_SIZE: Final = 1 << 30  # 1 GiB hugetlb pages
#: highest user-space address + 1 on x86-64 with 5-level paging (and above aarch64's 52 bits)
USER_ADDRESS_LIMIT: Final = 1 << 57
#: file offsets past this are certainly garbage (ext4's limit is 16 TiB for 4 KiB blocks)
MAX_OFFSET: Final = 1 << 62

_FIELDS: Final = ("base_host_virt_addr", "size", "offset")
#: 2**64 has 20 decimal digits: a longer integer is not an address or a size (and Python
#: refuses to convert more than 4300 digits at all: a ValueError, not a HandoffError)
MAX_INT_DIGITS: Final = 20


class HandoffError(Exception):
    """The peer sent something we cannot serve; the message says what and where."""


@attrs.frozen
class Mapping:
    """One guest memory region: ``size`` bytes at ``base_host_virt_addr`` in the
    client's address space, backed by the store at ``offset``."""

    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int

    @property
    def end(self) -> int:
        return self.base_host_virt_addr + self.size

    def store_offset(self, address: int) -> int:
        """The backend offset of client ``address`` (Firecracker's formula)."""
        if not self.base_host_virt_addr <= address < self.end:
            raise ValueError(f"address {address:#x} outside {self}")
        return self.offset + (address - self.base_host_virt_addr)

    def __str__(self) -> str:
        return (f"mapping {self.base_host_virt_addr:#x}+{self.size:#x} "
                f"(offset {self.offset:#x}, page size {self.page_size})")


def _int_field(entry: dict[str, object], key: str, where: str) -> int:
    if key not in entry:
        raise HandoffError(f"{where}: missing field {key!r}")
    value = entry[key]
    # bool is an int subclass: true/false are not sizes
    if type(value) is not int:
        raise HandoffError(f"{where}: field {key!r} must be an integer, "
                           f"got {type(value).__name__} {value!r:.40}")
    if value < 0:
        raise HandoffError(f"{where}: field {key!r} must not be negative, got {value}")
    return value


def _page_size(entry: dict[str, object], where: str) -> int:
    has_new = "page_size" in entry
    has_legacy = "page_size_kib" in entry
    if not has_new and not has_legacy:
        raise HandoffError(f"{where}: missing field 'page_size' (or the legacy 'page_size_kib')")
    ps = _int_field(entry, "page_size", where) if has_new else None
    legacy = _int_field(entry, "page_size_kib", where) if has_legacy else None
    if ps is not None and legacy is not None and ps != legacy:
        raise HandoffError(
            f"{where}: 'page_size' {ps} and 'page_size_kib' {legacy} disagree "
            "(the legacy 'page_size_kib' holds bytes, not KiB)")
    value = ps if ps is not None else legacy
    assert value is not None
    name = "page_size" if ps is not None else "page_size_kib"
    if value < MIN_PAGE_SIZE or value > MAX_PAGE_SIZE or value & (value - 1):
        hint = (" ('page_size_kib' holds bytes despite its name: 4 KiB pages are 4096)"
                if name == "page_size_kib" and 0 < value < MIN_PAGE_SIZE else "")
        raise HandoffError(f"{where}: {name} {value} is not a power of two between "
                           f"{MIN_PAGE_SIZE} and {MAX_PAGE_SIZE}{hint}")
    return value


def _one(entry: object, i: int, max_total: int) -> Mapping:
    where = f"mapping {i}"
    if not isinstance(entry, dict):
        raise HandoffError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    base, size, offset = (_int_field(entry, k, where) for k in _FIELDS)
    ps = _page_size(entry, where)
    if size == 0:
        raise HandoffError(f"{where}: size is 0")
    if size > max_total:
        raise HandoffError(f"{where}: size {size} exceeds the limit of {max_total} bytes")
    if base % ps or size % ps or offset % ps:
        raise HandoffError(
            f"{where}: base_host_virt_addr {base:#x}, size {size:#x} and offset {offset:#x} "
            f"must all be multiples of the page size {ps:#x}")
    if base == 0 or base + size > USER_ADDRESS_LIMIT:
        raise HandoffError(f"{where}: {base:#x}+{size:#x} is not a user-space address range")
    if offset + size > MAX_OFFSET:
        raise HandoffError(f"{where}: offset {offset:#x} + size {size:#x} is absurd")
    return Mapping(base, size, offset, ps)


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise HandoffError(f"invalid JSON: an integer of {digits} digits (more than "
                           f"{MAX_INT_DIGITS}: not an address or a size)")
    return int(text)


def parse_mappings(
    payload: bytes,
    *,
    max_mappings: int = DEFAULT_MAX_MAPPINGS,
    max_total: int = DEFAULT_MAX_TOTAL,
) -> tuple[Mapping, ...]:
    """Validate a handoff payload; returns the mappings sorted by address.

    Raises :class:`HandoffError` for: bytes that are not UTF-8 JSON, anything
    but a non-empty array of objects, integers of more than 20 digits,
    missing or non-integer fields, bad or disagreeing page sizes, unaligned
    or overlapping ranges, zero sizes, more than ``max_mappings`` entries or
    more than ``max_total`` bytes.  It raises nothing else for any payload
    (an unexpected failure of the parsing itself becomes a HandoffError too).
    """
    try:
        return _parse(payload, max_mappings, max_total)
    except HandoffError:
        raise
    except (ValueError, TypeError, ArithmeticError, RecursionError, MemoryError) as exc:
        raise HandoffError(f"unparseable payload ({type(exc).__name__}: {exc!s:.200})"
                           ) from None


def _parse(payload: bytes, max_mappings: int, max_total: int) -> tuple[Mapping, ...]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HandoffError(f"payload is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    # the VMM's C/Rust side may NUL-terminate the string
    text = text.rstrip("\x00 \t\r\n")
    if not text:
        raise HandoffError("empty payload: expected a JSON array of mappings")
    try:
        doc: object = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise HandoffError(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                           ) from None
    except RecursionError:
        raise HandoffError("invalid JSON: nested too deeply") from None
    if not isinstance(doc, list):
        raise HandoffError(f"expected a JSON array of mappings, got {type(doc).__name__}")
    if not doc:
        raise HandoffError("the mapping array is empty")
    if len(doc) > max_mappings:
        raise HandoffError(f"{len(doc)} mappings exceed the limit of {max_mappings}")
    maps = sorted((_one(e, i, max_total) for i, e in enumerate(doc)),
                  key=lambda m: m.base_host_virt_addr)
    total = sum(m.size for m in maps)
    if total > max_total:
        raise HandoffError(f"mappings total {total} bytes, over the limit of {max_total}")
    for a, b in itertools.pairwise(maps):
        if a.end > b.base_host_virt_addr:
            raise HandoffError(f"{a} overlaps {b}")
    return tuple(maps)


def payload_incomplete(payload: bytes | bytearray) -> bool:
    """True if ``payload`` looks like the start of a JSON array whose end has not arrived.

    A stream socket may split a large array over several reads; the server
    keeps reading (within its size and time limits) while this holds.
    """
    text = payload.rstrip(b"\x00 \t\r\n")
    return text.startswith(b"[") and not text.endswith(b"]")
