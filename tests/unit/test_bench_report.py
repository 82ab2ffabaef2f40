"""uffd_aio.bench.report: medians, ratios to C, target verdicts, tables (pure)."""

from __future__ import annotations

from typing import Any

from uffd_aio.bench import report


def run(contender: str, rnd: int, threads: int, ra: int, p50: float, mib: float,
        mode: str = "handoff", **kw: Any) -> dict[str, Any]:
    return {"contender": contender, "round": rnd, "mode": mode, "order": "seq",
            "threads": threads, "readahead": ra, "p50_us": p50, "p90_us": p50,
            "p99_us": p50, "mean_us": p50, "mib_per_s": mib, "wall_s": 1.0,
            "verified": True, **kw}


RUNS = [
    *(run("c", r, 1, 1, 8.0 + r, 400.0) for r in range(5)),
    *(run("asyncio", r, 1, 1, 9.0 + r, 300.0) for r in range(5)),
    *(run("c", r, 4, 1, 30.0, 500.0) for r in range(5)),
    *(run("asyncio", r, 4, 1, 60.0, 550.0) for r in range(5)),
    *(run("asyncio", r, 1, 64, 0.02, 1300.0) for r in range(5)),
    run("asyncio", 9, 1, 1, 999.0, 1.0, verified=False),  # a failed run is left out
    run("asyncio", 9, 1, 1, 999.0, 1.0, error="timeout"),
]


def test_summary_is_medians_over_good_runs() -> None:
    s = report.summarize(RUNS)
    row = s[("handoff", "seq", 1, 1)]
    assert row["c"]["p50_us"] == 10.0 and row["asyncio"]["p50_us"] == 11.0
    assert row["asyncio"]["n"] == 5


def test_ratios_and_targets() -> None:
    s = report.summarize(RUNS)
    assert report.ratio(s, ("handoff", "seq", 1, 1), "asyncio", "p50_us") == 1.1
    t = {x["target"]: x for x in report.targets(s, ["c", "asyncio"])}
    assert [x["met"] for x in t.values()] == [True, True, True]
    assert [x["ratio"] for x in t.values()] == [1.1, 1.1, 3.25]
    paired = report.paired_ratios(RUNS, "p50_us")
    assert round(paired[(("handoff", "seq", 1, 1), "asyncio")], 3) == round(11 / 10, 3)


def test_missing_contender_is_not_applicable() -> None:
    s = report.summarize([r for r in RUNS if r["threads"] == 1 and r["readahead"] == 1])
    t = report.targets(s, ["c", "uvloop"])
    assert all(x["met"] is None and x["ratio"] is None for x in t)


def test_tables_render() -> None:
    s = report.summarize(RUNS)
    head, rows = report.table_rows(s, ["c", "asyncio"])
    assert len(rows) == 3 and all(len(r) == len(head) for r in rows)
    md = report.md_table(head, rows)
    assert md.count("\n") == 4 and "| handoff | seq | 1 | 1 | 5 |" in md
    assert "MET" in report.targets_text(report.targets(s, ["c", "asyncio"]))
    assert report.text_table(head, rows).splitlines()[0].split()[0] == "mode"


def test_fewer_than_five_rounds_is_flagged() -> None:
    s = report.summarize([r for r in RUNS if r["round"] < 3])
    text = report.targets_text(report.targets(s, ["c", "asyncio"]))
    assert "only 3 rounds" in text
