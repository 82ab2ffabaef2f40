"""Benchmark results -> medians, ratios to the C handler, target verdicts, markdown, plots.

Pure except :func:`plot` (matplotlib, the optional ``plots`` extra).  A run is one JSON
line of a workload (C ``workload``/``inproc`` or :mod:`uffd_aio.bench.inproc`) plus the
harness's keys ``contender`` (``c``/``asyncio``/``uvloop``), ``round`` and ``readahead``.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

MIN_ROUNDS = 5  # the targets are medians of at least 5 rounds
FIELDS = ("p50_us", "p90_us", "p99_us", "mean_us", "mib_per_s", "wall_s")
C = "c"

Key = tuple[str, str, int, int]  # mode, order, threads, readahead


def key_of(run: dict[str, Any]) -> Key:
    return (run["mode"], run["order"], int(run["threads"]), int(run["readahead"]))


def summarize(runs: Iterable[dict[str, Any]]) -> dict[Key, dict[str, dict[str, float]]]:
    """{config: {contender: {field: median, "n": count}}} over the good runs."""
    groups: dict[Key, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.get("error") or r.get("verified") is False:
            continue
        groups[key_of(r)][r["contender"]].append(r)
    out: dict[Key, dict[str, dict[str, float]]] = {}
    for k, by in groups.items():
        out[k] = {}
        for contender, rs in by.items():
            med = {f: float(statistics.median(float(x[f]) for x in rs)) for f in FIELDS}
            med["n"] = float(len(rs))
            out[k][contender] = med
    return out


def paired_ratios(runs: Sequence[dict[str, Any]], field: str) -> dict[tuple[Key, str], float]:
    """Median over rounds of (contender / C in the same round): robust to drifting load."""
    by: dict[tuple[Key, int], dict[str, float]] = defaultdict(dict)
    for r in runs:
        if r.get("error") or r.get("verified") is False:
            continue
        by[(key_of(r), int(r["round"]))][r["contender"]] = float(r[field])
    acc: dict[tuple[Key, str], list[float]] = defaultdict(list)
    for (k, _), vals in by.items():
        c = vals.get(C)
        if not c:
            continue
        for contender, v in vals.items():
            if contender != C:
                acc[(k, contender)].append(v / c)
    return {k: float(statistics.median(v)) for k, v in acc.items()}


def ratio(summary: dict[Key, dict[str, dict[str, float]]], k: Key, contender: str,
          field: str) -> float | None:
    row = summary.get(k, {})
    if contender not in row or C not in row or not row[C][field]:
        return None
    return row[contender][field] / row[C][field]


# ---- targets -----------------------------------------------------------------

TARGETS = (
    ("T=1 cross-process per-fault cost (p50, ra 1, seq)", "<= 1.2x"),
    ("T=4 cross-process throughput (ra 1, seq)", ">= 1.0x"),
    ("seq scan, ra 64, T=1, vs the C handler without read-ahead", ">= 3x"),
)


def targets(summary: dict[Key, dict[str, dict[str, float]]],
            contenders: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    h1 = ("handoff", "seq", 1, 1)
    h4 = ("handoff", "seq", 4, 1)
    h64 = ("handoff", "seq", 1, 64)
    checks: tuple[Callable[[float], bool], ...] = (
        lambda v: v <= 1.2, lambda v: v >= 1.0, lambda v: v >= 3.0)
    for py in contenders:
        if py == C:
            continue
        r1 = ratio(summary, h1, py, "p50_us")
        r2 = ratio(summary, h4, py, "mib_per_s")
        r3 = None
        if h64 in summary and py in summary[h64] and C in summary.get(h1, {}):
            r3 = summary[h64][py]["mib_per_s"] / summary[h1][C]["mib_per_s"]
        keys = ((h1,), (h4,), (h64, h1))
        for (name, goal), val, ok, ks in zip(TARGETS, (r1, r2, r3), checks, keys, strict=True):
            n = min((int(summary[k][c]["n"]) for k in ks for c in (py, C)
                     if c in summary.get(k, {})), default=0)
            out.append({"contender": py, "target": name, "goal": goal,
                        "ratio": None if val is None else round(val, 3),
                        "met": None if val is None else bool(ok(val)), "rounds": n})
    return out


# ---- tables --------------------------------------------------------------------


def _fmt(v: float | None, nd: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.{nd}f}" if abs(v) < 100 else f"{v:.1f}"


def table_rows(summary: dict[Key, dict[str, dict[str, float]]],
               contenders: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    pys = [c for c in contenders if c != C]
    head = ["mode", "order", "T", "ra", "n", "C p50 us", "C MiB/s"]
    for py in pys:
        head += [f"{py} p50 us", f"{py} MiB/s", f"{py} p50 x", f"{py} MiB/s x"]
    rows = []
    for k in sorted(summary, key=lambda k: (k[0], k[1], k[3], k[2])):
        row_c = summary[k].get(C)
        n = int(min(v["n"] for v in summary[k].values()))
        cells = [k[0], k[1], str(k[2]), str(k[3]), str(n),
                 _fmt(row_c["p50_us"]) if row_c else "-",
                 _fmt(row_c["mib_per_s"]) if row_c else "-"]
        for py in pys:
            row = summary[k].get(py)
            cells += [_fmt(row["p50_us"]) if row else "-",
                      _fmt(row["mib_per_s"]) if row else "-",
                      _fmt(ratio(summary, k, py, "p50_us")),
                      _fmt(ratio(summary, k, py, "mib_per_s"))]
        rows.append(cells)
    return head, rows


def text_table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w[i]) for i, h in enumerate(head))]
    lines += ["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(lines)


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def targets_text(ts: list[dict[str, Any]], md: bool = False) -> str:
    lines = []
    if md:
        lines += ["| contender | target | goal | ratio | verdict |", "|---|---|---|---|---|"]
    for t in ts:
        verdict = "n/a" if t["met"] is None else "MET" if t["met"] else "missed"
        if t["met"] is not None and t.get("rounds", MIN_ROUNDS) < MIN_ROUNDS:
            verdict += f" (only {t['rounds']} rounds: a verdict needs {MIN_ROUNDS})"
        r = "-" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        if md:
            lines.append(f"| {t['contender']} | {t['target']} | {t['goal']} | {r} | {verdict} |")
        else:
            lines.append(f"{t['contender']:>8}  {t['target']:<58} {t['goal']:>8}  {r:>7}  "
                         f"{verdict}")
    return "\n".join(lines)


# ---- plots ----------------------------------------------------------------------


def plot(summary: dict[Key, dict[str, dict[str, float]]], contenders: Sequence[str],
         outdir: str, title: str = "") -> list[str]:
    """PNGs into ``outdir``; returns their paths.  Raises ImportError without matplotlib."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    paths = []
    modes = sorted({k[0] for k in summary})
    colors = {"c": "#555555", "asyncio": "#1f77b4", "uvloop": "#ff7f0e", "native": "#2ca02c",
              "native-uvloop": "#9467bd", "serve-file": "#d62728", "serve-file-py": "#8c564b"}
    width = 0.8 / max(1, len(contenders))

    def bars(ax: Any, keys: list[Key], labels: list[str], field: str) -> None:
        for j, c in enumerate(contenders):
            vals = [summary[k][c][field] if c in summary.get(k, {}) else 0.0 for k in keys]
            xs = [i + (j - (len(contenders) - 1) / 2) * width for i in range(len(keys))]
            ax.bar(xs, vals, width, label=c, color=colors.get(c))
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels)

    # 1. per-fault latency (p50, ra 1) by thread count
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        keys = sorted((k for k in summary if k[0] == mode and k[3] == 1 and k[1] == "seq"),
                      key=lambda k: k[2])
        bars(ax, keys, [f"T={k[2]}" for k in keys], "p50_us")
        ax.set_title(f"{mode}: per-touch latency p50, ra 1, seq")
        ax.set_ylabel("us (lower is better)")
        ax.legend()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    p = os.path.join(outdir, "latency_p50.png")
    fig.savefig(p, dpi=80)
    plt.close(fig)
    paths.append(p)

    # 2. throughput by read-ahead window, for each thread count (the dashed line: 3x the
    #    C handler without read-ahead at T=1, the read-ahead target)
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        keys = sorted((k for k in summary if k[0] == mode and k[1] == "seq"),
                      key=lambda k: (k[2], k[3]))
        bars(ax, keys, [f"T{k[2]}\nra{k[3]}" for k in keys], "mib_per_s")
        base = summary.get((mode, "seq", 1, 1), {}).get(C)
        if base:
            ax.axhline(3 * base["mib_per_s"], color="red", lw=0.8, ls="--",
                       label="3x C, T=1 ra 1")
        ax.set_title(f"{mode}: throughput, seq")
        ax.set_ylabel("MiB/s (higher is better)")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    p = os.path.join(outdir, "throughput.png")
    fig.savefig(p, dpi=80)
    plt.close(fig)
    paths.append(p)

    # 3. ratios to C: per-fault latency where every touch faults (ra 1), throughput everywhere
    pys = [c for c in contenders if c != C]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 2.5]})
    all_keys = sorted((k for k in summary if k[1] == "seq"), key=lambda k: (k[0], k[2], k[3]))
    for ax, field, what, line in ((axes[0], "p50_us", "p50 per-fault latency / C, ra 1\n"
                                   "(lower is better; target T=1 handoff <= 1.2)", 1.2),
                                  (axes[1], "mib_per_s", "throughput / C in the same config "
                                   "(higher is better)", 1.0)):
        keys = [k for k in all_keys if k[3] == 1] if field == "p50_us" else all_keys
        labels = [f"{k[0][:2]} T{k[2]}" + ("" if field == "p50_us" else f"\nra{k[3]}")
                  for k in keys]
        for j, c in enumerate(pys):
            vals = [ratio(summary, k, c, field) or 0.0 for k in keys]
            xs = [i + (j - (len(pys) - 1) / 2) * (0.8 / len(pys)) for i in range(len(keys))]
            ax.bar(xs, vals, 0.8 / len(pys), label=c, color=colors.get(c))
        ax.axhline(line, color="red", lw=0.8, ls="--")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_title(what, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    p = os.path.join(outdir, "ratios.png")
    fig.savefig(p, dpi=80)
    plt.close(fig)
    paths.append(p)
    return paths
