"""uffd_aio.wpos: the write-interface position encoding (pure)."""

from __future__ import annotations

import pathlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uffd_aio import wpos
from uffd_aio.wpos import WriteOp, WritePos, WritePosError

ROOT = pathlib.Path(__file__).resolve().parents[2]
PS = 4096

dsts = st.integers(min_value=0, max_value=(1 << 63) - 1).map(lambda x: x & ~0xFFF)
ops = st.sampled_from(list(WriteOp))


def test_values_match_uapi_md() -> None:
    # the numbers the brief and kernel_patches/uapi.md give
    assert {op.name: int(op) for op in WriteOp} == {
        "COPY": 0x0, "ZEROPAGE": 0x2, "CONTINUE": 0x4, "WP": 0x6, "UNPROTECT": 0x8,
        "WAKE": 0xA, "POISON": 0xC}
    assert (wpos.DONTWAKE, wpos.MODE_WP, wpos.OP_MASK, wpos.POS_MASK) == (0x1, 0x10, 0xE, 0xFFF)
    assert wpos.RESERVED_MASK == 0xFE0


def _patch_defines() -> dict[str, int]:
    """UFFDIO_WRITE_* as the kernel series defines them (the patch is the truth)."""
    patches = sorted((ROOT / "kernel_patches" / "6.12").glob("*.patch"))
    text = "\n".join(p.read_text() for p in patches)
    out: dict[str, int] = {}
    for m in re.finditer(r"^\+#define (UFFDIO_WRITE_\w+)\s+\(\(__u64\)(0x[0-9a-f]+|\d+)"
                         r"(?:<<(\d+))?\)", text, re.M):
        out[m.group(1)] = int(m.group(2), 0) << int(m.group(3) or 0)
    return out


def test_values_match_the_kernel_patch() -> None:
    d = _patch_defines()
    if not d:
        pytest.skip("kernel_patches/6.12 not in this checkout")
    assert d["UFFDIO_WRITE_DONTWAKE"] == wpos.DONTWAKE
    assert d["UFFDIO_WRITE_OP_MASK"] == wpos.OP_MASK
    assert d["UFFDIO_WRITE_MODE_WP"] == wpos.MODE_WP
    assert d["UFFDIO_WRITE_POS_MASK"] == wpos.POS_MASK
    for op in WriteOp:
        assert d[f"UFFDIO_WRITE_OP_{op.name}"] == int(op), op


def test_examples() -> None:
    assert wpos.encode(0x7F0000001000, WriteOp.COPY) == 0x7F0000001000
    assert wpos.encode(0x7F0000001000, WriteOp.COPY, mode_wp=True) == 0x7F0000001010
    assert wpos.encode(0x2000, WriteOp.ZEROPAGE, dontwake=True) == 0x2003
    assert wpos.encode(0x2000, WriteOp.CONTINUE, mode_wp=True) == 0x2014
    assert wpos.encode(0x2000, WriteOp.WAKE) == 0x200A
    assert wpos.decode(0x200D) == WritePos(0x2000, WriteOp.POISON, dontwake=True)
    assert WriteOp.COPY.reads_buffer and not WriteOp.ZEROPAGE.reads_buffer
    assert WriteOp.WAKE.all_or_nothing and not WriteOp.COPY.all_or_nothing


@given(dsts, ops, st.booleans(), st.booleans())
def test_roundtrip(dst: int, op: WriteOp, dontwake: bool, mode_wp: bool) -> None:
    valid = not (mode_wp and op not in wpos.MODE_WP_OPS) and not (dontwake and op is WriteOp.WAKE)
    if not valid:
        with pytest.raises(WritePosError):
            wpos.encode(dst, op, dontwake=dontwake, mode_wp=mode_wp)
        return
    pos = wpos.encode(dst, op, dontwake=dontwake, mode_wp=mode_wp)
    assert pos & ~wpos.POS_MASK == dst
    assert pos & wpos.RESERVED_MASK == 0
    back = wpos.decode(pos)
    assert back == WritePos(dst, op, dontwake, mode_wp)
    assert back.encode() == pos


@given(st.integers(min_value=0, max_value=(1 << 63) - 1))
def test_decode_accepts_exactly_what_the_kernel_accepts(pos: int) -> None:
    low = pos & 0xFFF
    op = low & 0xE
    kernel_ok = (not low & ~(0x1 | 0xE | 0x10) and op != 0xE
                 and not (low & 0x10 and op not in (0x0, 0x4))
                 and not (op == 0xA and low & 0x1))
    if kernel_ok:
        assert wpos.decode(pos).encode() == pos
    else:
        with pytest.raises(WritePosError):
            wpos.decode(pos)


@pytest.mark.parametrize("dst", [0x1001, 0x800, 0xFFF])
def test_unaligned_destination(dst: int) -> None:
    with pytest.raises(WritePosError, match="aligned"):
        wpos.encode(dst, WriteOp.COPY)


def test_huge_page_alignment() -> None:
    assert wpos.encode(2 << 20, WriteOp.COPY, page_size=2 << 20) == 2 << 20
    with pytest.raises(WritePosError, match="aligned"):
        wpos.encode(PS, WriteOp.COPY, page_size=2 << 20)
    with pytest.raises(WritePosError, match="power of two"):
        wpos.encode(0, WriteOp.COPY, page_size=3000)


@pytest.mark.parametrize("pos", [-1, 1 << 63, 1 << 64])
def test_out_of_range(pos: int) -> None:
    with pytest.raises(WritePosError):
        wpos.decode(pos)
    with pytest.raises(WritePosError):
        wpos.encode(pos & ~0xFFF if pos > 0 else -4096, WriteOp.COPY)


def test_invalid_combinations() -> None:
    with pytest.raises(WritePosError, match="MODE_WP"):
        wpos.encode(0, WriteOp.ZEROPAGE, mode_wp=True)
    with pytest.raises(WritePosError, match="DONTWAKE"):
        wpos.encode(0, WriteOp.WAKE, dontwake=True)
    with pytest.raises(WritePosError, match="reserved op"):
        wpos.decode(0x100E)
    with pytest.raises(WritePosError, match="reserved bits"):
        wpos.decode(0x1020)
    with pytest.raises(ValueError):
        wpos.encode(0, 0xE)  # type: ignore[arg-type]
