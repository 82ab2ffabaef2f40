#!/usr/bin/env python3
"""Median table over repeated smoke.sh runs (JSON lines on stdin).

    REPS=5 benchmarks/c/smoke.sh | python3 benchmarks/c/summarize.py [--markdown]
"""
import json
import re
import statistics
import sys
from collections import defaultdict

FIELDS = ("p50_us", "p90_us", "p99_us", "mean_us", "mib_per_s")


def main() -> None:
    md = "--markdown" in sys.argv[1:]
    groups = defaultdict(list)
    for line in sys.stdin:
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if "error" in r:
            print("error run:", line, file=sys.stderr)
            continue
        key = (r["mode"], r.get("label", ""), r["threads"], r["order"])
        groups[key].append(r)
    head = ("mode", "label", "threads", "order", "n") + FIELDS
    if md:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    else:
        print(" ".join(f"{h:>9}" for h in head))
    def order(k):
        m = re.match(r"ra(\d+)(.*)", k[1])
        return (k[0], (m.group(2), int(m.group(1))) if m else (k[1], 0), k[2], k[3])

    for key in sorted(groups, key=order):
        runs = groups[key]
        vals = [statistics.median(r[f] for r in runs) for f in FIELDS]
        row = [*map(str, key), str(len(runs))] + [f"{v:.1f}" if v >= 100 else f"{v:.2f}" for v in vals]
        if md:
            print("| " + " | ".join(row) + " |")
        else:
            print(" ".join(f"{c:>9}" for c in row))
        if any(r.get("verified") is False for r in runs):
            print("  ^ NOT VERIFIED in some runs", file=sys.stderr)


if __name__ == "__main__":
    main()
