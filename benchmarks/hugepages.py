#!/usr/bin/env python3
"""Restore throughput with 2 MiB hugetlbfs pages vs 4 KiB pages, C handler next to uffd_aio.

    .venv/bin/python benchmarks/hugepages.py [--mib 512] [--rounds 3] [--threads 1]

In-process runs (one process: a handler and T native threads reading one word per page,
then verifying every byte): ``benchmarks/c/build/inproc`` (the C reference handler,
copying from a pre-computed pattern snapshot, ``--snapshot-mib``) and
``python -m uffd_aio.bench.inproc`` (a Pager on asyncio, the benchmark handler copying
from a pre-computed pattern buffer), each with ``--page-size 4096`` and ``2097152``.
Rounds are interleaved.  Reserves the 2 MiB pool it needs (root) and restores the old
size at the end.  Prints GB/s of the restore (region size / wall time of the touch).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

from uffd_aio import hugepages

ROOT = pathlib.Path(__file__).resolve().parent.parent
C_DIR = ROOT / "benchmarks" / "c"
H = hugepages.HUGE_2M
NR = f"/sys/kernel/mm/hugepages/hugepages-{H >> 10}kB/nr_hugepages"


def run(cmd: list[str]) -> dict[str, object]:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    line = [x for x in out.splitlines() if x.startswith("{")][-1]
    res: dict[str, object] = json.loads(line)
    if not res.get("verified"):
        raise SystemExit(f"not verified: {' '.join(cmd)}\n{line}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(C_DIR), "build/inproc"], check=True)
    n = a.mib << 20
    total, _ = hugepages.pool(H)
    with open(NR, "w") as f:
        f.write(str(total + n // H + 8))
    results: dict[tuple[str, int], list[float]] = {}
    try:
        if hugepages.pool(H)[1] < n // H:
            raise SystemExit(f"the kernel reserved fewer than {n // H} free 2 MiB pages")
        for _ in range(a.rounds):
            for ps in (4096, H):
                for who in ("c", "asyncio"):
                    if who == "c":
                        cmd = [str(C_DIR / "build" / "inproc"), "--pages", str(n // ps),
                               "--page-size", str(ps), "--threads", str(a.threads),
                               "--snapshot-mib", str(a.mib)]
                    else:
                        cmd = [sys.executable, "-m", "uffd_aio.bench.inproc", "--pages",
                               str(n // ps), "--page-size", str(ps), "--threads",
                               str(a.threads)]
                    res = run(cmd)
                    results.setdefault((who, ps), []).append(n / float(res["wall_s"]) / 1e9)
    finally:
        with open(NR, "w") as f:
            f.write(str(total))
    print(f"restore of {a.mib} MiB, {a.threads} thread(s), GB/s (median of {a.rounds}; "
          "rounds in brackets)")
    print(f"{'handler':10s} {'4 KiB pages':>28s} {'2 MiB pages':>28s}")
    for who in ("c", "asyncio"):
        cells = []
        for ps in (4096, H):
            v = results[(who, ps)]
            cells.append(f"{statistics.median(v):6.2f} [{', '.join(f'{x:.2f}' for x in v)}]")
        print(f"{who:10s} {cells[0]:>28s} {cells[1]:>28s}")


if __name__ == "__main__":
    main()
