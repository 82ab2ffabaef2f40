"""``uffd-aio workingset show / merge`` (no kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest

from uffd_aio import workingset
from uffd_aio.cli import build_parser
from uffd_aio.workingset import WorkingSet


def run(*argv: str) -> int:
    """The subcommand without cli.main, which configures structlog for the whole process."""
    args = build_parser().parse_args(["workingset", *argv])
    rc: int = args._main(args)
    return rc


def test_merge_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = []
    for i, order in enumerate([(1, 2, 3), (3, 2, 4), (2, 3, 5)]):
        files.append(str(tmp_path / f"r{i}.ws"))
        workingset.write(files[-1], WorkingSet(4096, 10, order, frozenset({order[0]})))
    out = str(tmp_path / "m.ws")
    assert run("merge", *files, "--min-runs", "2", "-o", out) == 0
    merged = workingset.read(out)
    assert merged.order == (2, 3) and merged.runs == 3
    assert run("show", out, files[0]) == 0
    text = capsys.readouterr().out
    assert "2 pages" in text and "3 run(s)" in text and "jaccard" in text


def test_errors_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = str(tmp_path / "a.ws"), str(tmp_path / "b.ws")
    workingset.write(a, WorkingSet(4096, 10, (1,)))
    workingset.write(b, WorkingSet(4096, 20, (1,)))
    assert run("merge", a, b, "-o", str(tmp_path / "o")) == 2
    assert "b.ws was recorded for a snapshot of 20 pages" in capsys.readouterr().err
    (tmp_path / "bad").write_bytes(b"garbage")
    assert run("show", str(tmp_path / "bad")) == 2
    assert "too short" in capsys.readouterr().err
