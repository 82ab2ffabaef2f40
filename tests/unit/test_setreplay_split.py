"""The pure parts of the installer's page-cache check: mincore vectors to pages, and runs
cut into what is resident (copied from the mapping) and what is not (read with io_uring)."""

from __future__ import annotations

from uffd_aio.serving.setreplay import read_extents, resident_pages, split_runs


def test_resident_pages_takes_bit_zero() -> None:
    # mincore only defines bit 0; the others are reserved
    assert resident_pages(bytes([0, 1, 2, 3, 0xFE, 0xFF])) == bytes([0, 1, 0, 1, 0, 1])
    assert resident_pages(b"") == b""


def test_resident_pages_of_larger_pages_needs_every_system_page() -> None:
    vec = bytes([1, 1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    assert resident_pages(vec, 4) == bytes([1, 0, 0])


def test_split_runs_cuts_at_residency_changes() -> None:
    lo = 10
    #          pages 10..25
    res = bytes([1, 1, 0, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1])
    runs = [(10, 6), (17, 2), (20, 6)]
    warm, cold = split_runs(runs, lo, res)
    assert warm == [(10, 2), (14, 1), (17, 2), (23, 3)]
    assert cold == [(12, 2), (15, 1), (20, 3)]
    # every page lands on exactly one side
    pages = {p for f, n in runs for p in range(f, f + n)}
    got = [p for f, n in warm + cold for p in range(f, f + n)]
    assert sorted(got) == sorted(pages) and len(got) == len(pages)


def test_split_runs_all_one_side() -> None:
    assert split_runs([(0, 4)], 0, b"\x01" * 4) == ([(0, 4)], [])
    assert split_runs([(0, 4)], 0, b"\x00" * 4) == ([], [(0, 4)])
    assert split_runs([], 0, b"") == ([], [])


def test_read_extents_merges_close_runs_and_caps_length() -> None:
    runs = [(0, 2), (5, 1), (30, 3), (34, 1)]
    assert read_extents(runs, 4, 256) == [(0, 6, [(0, 2), (5, 1)]),
                                         (30, 5, [(30, 3), (34, 1)])]
    assert read_extents(runs, 0, 256) == [(0, 2, [(0, 2)]), (5, 1, [(5, 1)]),
                                         (30, 3, [(30, 3)]), (34, 1, [(34, 1)])]
    # a long run is cut; a neighbour joins only while the READ stays within max_pages
    assert read_extents([(0, 10), (11, 2)], 4, 4) == [
        (0, 4, [(0, 4)]), (4, 4, [(4, 4)]), (8, 2, [(8, 2)]), (11, 2, [(11, 2)])]
    assert read_extents([(0, 3), (4, 1)], 4, 8) == [(0, 5, [(0, 3), (4, 1)])]
    assert read_extents([], 4, 8) == []


def test_read_extents_cover_every_run_once() -> None:
    runs = [(p, 1 + p % 3) for p in range(0, 400, 7)]
    ext = read_extents(runs, 16, 64)
    inner = [r for _, _, rs in ext for r in rs]
    pages = [p for f, n in inner for p in range(f, f + n)]
    assert pages == [p for f, n in runs for p in range(f, f + n)]
    for first, n, rs in ext:
        assert n <= 64 and rs[0][0] == first and rs[-1][0] + rs[-1][1] == first + n
