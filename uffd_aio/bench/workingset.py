"""Working-set replay: demand faults and restore time of a restore that touches a fixed set.

    uffd-aio bench --workingset [--quick] [--cold] [--rounds N]
    .venv/bin/python benchmarks/workingset.py [--mib 256] [--subset 300] [--repeats 5]
                                             [--threads 2] [--quick] [--cold] [--json FILE]

A snapshot file of ``--mib`` MiB (the benchmarks' pattern) is served by an in-process
``HandoffServer`` (native engine for faults) to the C ``workload``, which touches a fixed
random ``--subset`` (permille) of its pages, the same set every run (``--set-seed``), in
a different random order each run (``--seed``), and verifies every byte it touched.

First, recording runs (other orders): ``--record-set`` three times, merged with
``--min-runs 2``; ``--record`` once (the order trace).  Then ``--repeats`` rounds, each
running the five configurations interleaved, with a new order per round:

* ``none``: no prefetch (the native engine serves each fault, one page);
* ``readahead``: adaptive read-ahead (``--readahead adaptive``);
* ``order``: order replay of the trace (``--replay TRACE``, today's record/replay);
* ``set``: working-set replay (``--replay SET``);
* ``set+fill``: the same, then the rest of the memory (``--fill``).

Reported per configuration (medians over rounds): demand faults (fault messages the
server saw, duplicates included), as a share of the set's pages; the restore time (the
workload's touch phase, first touch to last) and its speed-up over ``none``: the median
over rounds of ``none``'s time divided by the configuration's in the same round (paired,
so a drifting machine load cancels out as far as it can); the replay's
``set_installed_s``.  The snapshot is in the page cache (just written), unless ``--cold``:
then its pages are evicted (``posix_fadvise(DONTNEED)`` of that file) before each run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
from structlog.testing import capture_logs

from uffd_aio import testing, workingset
from uffd_aio.server import HandoffServer
from uffd_aio.stores.file import FileBackend

ROOT = Path(__file__).resolve().parents[2]
PS = 4096
CONFIGS = ("none", "readahead", "order", "set", "set+fill")


def build_workload() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT / "benchmarks" / "c"), "build/workload"],
                   check=True, timeout=300)
    return ROOT / "benchmarks" / "c" / "build" / "workload"


def write_snapshot(path: Path, nbytes: int) -> None:
    chunk = 8 << 20
    with open(path, "wb") as f:
        for off in range(0, nbytes, chunk):
            f.write(testing.pattern_bytes(off, min(chunk, nbytes - off)))


async def one_run(wl: Path, snap: Path, sock: str, pages: int, args: argparse.Namespace,
                  seed: int, **server_kw: Any) -> dict[str, Any]:
    if args.cold:  # drop this file's pages from the page cache (only this file's)
        fd = os.open(snap, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    backend = await FileBackend.open(snap)
    try:
        with capture_logs() as logs:
            async with HandoffServer(sock, backend, handoff_timeout=5.0,
                                     **server_kw) as server:
                proc = await asyncio.create_subprocess_exec(
                    str(wl), "--socket", sock, "--pages", str(pages), "--threads",
                    str(args.threads), "--regions", "1", "--order", "random", "--subset",
                    str(args.subset), "--set-seed", str(args.set_seed), "--seed", str(seed),
                    "--timeout", "120", stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE)
                out, err = await asyncio.wait_for(proc.communicate(), 180)
                if proc.returncode != 0:
                    raise RuntimeError(f"workload failed ({proc.returncode}): {out!r} {err!r}")
                await server.wait_clients(0, timeout=30)
    finally:
        await backend.aclose()
    doc: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    if doc.get("verified") is not True:
        raise RuntimeError(f"workload saw wrong bytes: {doc}")
    rel = next(e for e in logs if e["event"] == "uffd_aio.client_released")
    inst = [e for e in logs if e["event"] == "uffd_aio.workingset_installed"]
    return {"wall_s": doc["wall_s"], "touched": doc["faults_timed"],
            "demand_faults": rel["faults"],
            "set_installed_s": inst[0]["set_installed_s"] if inst else None,
            "fully_resident_s": inst[0]["fully_resident_s"] if inst else None,
            "pages_by_replay": rel.get("ws_pages_by_replay"),
            "pages_by_fill": rel.get("ws_pages_by_fill"),
            "pages_read": rel.get("ws_pages_read")}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--subset", type=int, default=300, help="permille of pages touched")
    ap.add_argument("--set-seed", type=int, default=2024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1024, help="--replay-chunk")
    ap.add_argument("--quick", action="store_true", help="64 MiB, 2 repeats")
    ap.add_argument("--cold", action="store_true",
                    help="evict the snapshot from the page cache before each measured run "
                         "(posix_fadvise DONTNEED of that file only)")
    ap.add_argument("--json", metavar="FILE", help="write every run as JSON")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_arguments(ap)
    return asyncio.run(run(ap.parse_args(argv)))


def _drop(_logger: Any, _name: str, _event: Any) -> Any:
    raise structlog.DropEvent


async def run(args: argparse.Namespace) -> int:
    # an application: logs off except what each run captures (info and up: the
    # server's per-client events); also undoes the CLI's warning-level filter
    structlog.configure(processors=[_drop],
                        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
                        cache_logger_on_first_use=False)
    if args.quick:
        args.mib, args.repeats = min(args.mib, 64), min(args.repeats, 2)
    wl = build_workload()
    pages = args.mib * 256
    with tempfile.TemporaryDirectory(prefix="uffd-ws-bench-") as tmp:
        d = Path(tmp)
        snap = d / "mem.snap"
        write_snapshot(snap, pages * PS)
        sock = str(d / "uffd.sock")
        t0 = time.monotonic()
        recs = []
        for i in range(3):
            recs.append(d / f"run{i}.ws")
            await one_run(wl, snap, sock, pages, args, 1000 + i, record_set=recs[-1])
        sets = [workingset.read(p) for p in recs]
        merged = workingset.merge(sets, min_runs=2)
        workingset.write(d / "merged.ws", merged)
        await one_run(wl, snap, sock, pages, args, 2000, record=d / "order.trace")
        jac = workingset.jaccard(sets[0], sets[1])
        print(f"recorded: 3 sets of {len(sets[0])} pages (Jaccard {jac:.2f}), merged "
              f"{len(merged)}; an order trace; {time.monotonic() - t0:.1f} s", file=sys.stderr)
        kw: dict[str, dict[str, Any]] = {
            "none": {},
            "readahead": {"attach_options": {"readahead": "adaptive"}},
            "order": {"replay": d / "order.trace"},
            "set": {"replay": d / "merged.ws", "replay_chunk": args.chunk},
            "set+fill": {"replay": d / "merged.ws", "fill": True, "replay_chunk": args.chunk},
        }
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
        for r in range(args.repeats):
            for c in CONFIGS:
                res = await one_run(wl, snap, sock, pages, args, 3000 + r, **kw[c])
                runs[c].append(res)
                print(f"round {r + 1} {c:10s} wall {res['wall_s']:.4f} s, demand faults "
                      f"{res['demand_faults']}, set installed {res['set_installed_s']}, "
                      f"pages read by io_uring {res['pages_read']}",
                      file=sys.stderr)
    set_pages = len(merged)
    load = os.getloadavg()
    cache = "cold" if args.cold else "page cache"
    print(f"\n{args.mib} MiB snapshot ({cache}), set {set_pages} pages ({args.subset / 10:.0f}%), "
          f"{args.threads} touching threads, {args.repeats} rounds, medians; "
          f"loadavg {load[0]:.2f} {load[1]:.2f}")
    print(f"{'config':10s} {'demand faults':>14s} {'of set':>7s} {'restore s':>10s} "
          f"{'speed-up':>9s} {'set installed s':>16s}")
    summary: dict[str, Any] = {}
    for c in CONFIGS:
        faults = statistics.median(x["demand_faults"] for x in runs[c])
        wall = statistics.median(x["wall_s"] for x in runs[c])
        inst = [x["set_installed_s"] for x in runs[c] if x["set_installed_s"] is not None]
        inst_s = f"{statistics.median(inst):.4f}" if inst else "-"
        # paired: each round's "none" against the same round's run (the load drifts)
        speedup = statistics.median(n["wall_s"] / x["wall_s"]
                                    for n, x in zip(runs["none"], runs[c], strict=True))
        summary[c] = {"demand_faults": faults, "share": faults / set_pages, "wall_s": wall,
                      "speedup": speedup}
        print(f"{c:10s} {faults:14.0f} {faults / set_pages:7.1%} {wall:10.4f} "
              f"{speedup:8.2f}x {inst_s:>16s}")
    s = summary["set"]
    print(f"\ntargets: set replay leaves {s['share']:.1%} of the set to demand faults "
          f"(<= 5%: {'met' if s['share'] <= 0.05 else 'missed'}); restores "
          f"{s['speedup']:.2f}x faster than no prefetch (>= 3x: "
          f"{'met' if s['speedup'] >= 3 else 'missed'})")
    if args.json:
        with open(args.json, "w") as f:  # noqa: ASYNC230 (the runs are over)
            json.dump({"args": vars(args), "runs": runs, "summary": summary}, f, indent=1,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
