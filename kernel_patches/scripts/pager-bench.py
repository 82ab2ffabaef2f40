"""Per-fault cost of the Python pager: ioctl vs ring writes vs ring writes + poll mode.

Runs inside one guest (kernel_patches/scripts/pager-bench.sh boots it) so that
every configuration sees the same kernel, the same emulated CPUs and the same
noise; the configurations are interleaved round by round (the order rotates)
and each number is the median over the rounds.

One round of one configuration: a fresh Pager (``backend=``, ``poll_budget_us=``)
maps ``--pages`` anonymous pages, a sync handler returns each page's content
(a precomputed pattern: UFFDIO_COPY / a COPY write), and ``--threads`` native
threads (uffd_aio.testing.scan, GIL released) touch one word per page in
order, timing each first touch.  Two per-fault numbers per round:

* ``lat``: the median of the per-page first-touch latencies (the faulting
  thread's round trip: fault -> pager -> resolution -> wake-up);
* ``wall``: scan wall time / pages (what a fault costs including everything
  the pager does between faults).

Afterwards every page is verified against the pattern.  Prints a markdown
table (medians, ratio to ``ioctl``) and writes all rounds as JSON.

Configurations: ``ioctl`` (the stock path: UFFDIO_COPY on the loop thread),
``ring`` (COPY as an io_uring WRITE on the UFFDIO_WRITE_FD fd, submitted with
the next read), ``ring+poll`` (plus UFFD_FEATURE_POLL, faulting threads spin up
to ``--budget-us``), ``ioctl+poll``; ``X+poll=N`` overrides the budget (N us).
On a kernel without the series only the ``ioctl`` configurations run.

``native*`` configurations serve the same content with the native engine
(``region.serve_from(pattern)``, one page per fault, no handler): ``native``
(UFFDIO_COPY from C), ``native+ring`` (the engine's io_uring WRITEs on the
writer fd), ``native+ring+poll``, ``native+poll`` (ioctls + poll mode), and
the same with ``+spin`` (the engine keeps reading the uffd in C for
``--native-budget-us`` after a batch: ``Pager(native_budget_us=)``); their
ratio column is relative to ``native`` (the engine's own stock path: ioctls,
no poll mode, no spin), not to ``ioctl``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import structlog
import uvloop

import uffd_aio
from uffd_aio import Feature, testing

PS = os.sysconf("SC_PAGE_SIZE")
NATIVE_BUDGET_US = 200.0  # --native-budget-us
CONFIGS: dict[str, dict[str, Any]] = {
    "ioctl": {"backend": "ioctl"},
    "ring": {"backend": "ring"},
    "ring+poll": {"backend": "ring", "poll": True},
    "ioctl+poll": {"backend": "ioctl", "poll": True},
    "native": {"backend": "ioctl", "native": True},
    "native+ring": {"backend": "ring", "native": True},
    "native+ring+poll": {"backend": "ring", "poll": True, "native": True},
    "native+poll": {"backend": "ioctl", "poll": True, "native": True},
    # +spin: the engine keeps reading the uffd in C for --native-budget-us after a
    # batch (Pager(native_budget_us=)), so consecutive faults skip the event loop
    "native+spin": {"backend": "ioctl", "native": True, "spin": True},
    "native+ring+spin": {"backend": "ring", "native": True, "spin": True},
    "native+ring+poll+spin": {"backend": "ring", "poll": True, "native": True, "spin": True},
    "native+poll+spin": {"backend": "ioctl", "poll": True, "native": True, "spin": True},
}


def baseline(name: str) -> str:
    """The configuration a row's ratio is relative to (its own stock path)."""
    return "native" if name.startswith("native") else "ioctl"



def config_kwargs(name: str, budget_us: float) -> dict[str, Any]:
    """Pager options of a configuration; ``X+poll=N`` spins up to N us instead of --budget-us."""
    base, _, budget = name.partition("=")
    if base not in CONFIGS:
        raise SystemExit(f"unknown configuration {name!r}: {', '.join(CONFIGS)} (+poll=N)")
    kw = dict(CONFIGS[base])
    if kw.pop("poll", False):
        kw["poll_budget_us"] = float(budget) if budget else budget_us
    return kw


async def one_round(name: str, pages: int, threads: int, budget_us: float,
                    store: bytearray) -> dict[str, Any]:
    kw = config_kwargs(name, budget_us)
    native = kw.pop("native", False)
    if kw.pop("spin", False):
        kw["native_budget_us"] = NATIVE_BUDGET_US
    view = memoryview(store)
    async with uffd_aio.Pager(name=f"bench-{name}", **kw) as pager:
        region = pager.map(pages * PS)
        if native:
            region.serve_from(store)  # the engine, one page per fault
        else:
            @region.on_fault
            def on_fault(ev: uffd_aio.PageFault) -> memoryview:
                return view[ev.offset:ev.offset + PS]

        res = await asyncio.wait_for(
            testing.scan(region.address, region.length, threads=threads, op="read",
                         latencies=True), 600)
        bad = await testing.verify(region.address, region.length)
        st = pager.stats
        lat = sorted(res.latencies_ns or [])
        out: dict[str, Any] = {
            "config": name, "backend": pager.backend, "poll_budget_ns": pager.poll_budget_ns,
            "pages": pages, "threads": threads,
            "lat_ns": statistics.median(lat), "p90_ns": lat[int(len(lat) * 0.9)],
            "wall_ns": res.wall_s * 1e9 / pages, "verified": bad < 0,
            "faults": st.faults, "ring_writes": st.ring_writes + st.native_ring_writes,
            "ioctls": st.ioctls + st.native_ioctls, "reads": st.reads + st.native_reads,
            "errors": st.errors, "native_faults": st.native_faults,
        }
    if native and (st.native_faults < pages or st.python_faults):
        raise SystemExit(f"{name}: faults not served by the native engine: {out}")
    if not out["verified"] or out["errors"]:
        raise SystemExit(f"{name}: verification failed or errors: {out}")
    return out


def run(args: argparse.Namespace) -> int:
    patched = bool(uffd_aio.available_features() & Feature.WRITE)
    configs = [c for c in args.configs if patched or ("ring" not in c and "poll" not in c)]
    global NATIVE_BUDGET_US
    NATIVE_BUDGET_US = args.native_budget_us
    if args.native_reads is not None:
        for c in CONFIGS.values():
            if c.get("native"):
                c["native_reads"] = args.native_reads
    store = testing.pattern_bytes(0, args.pages * PS)
    loops = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for r in range(args.rounds + 1):  # round 0 is a warm-up, not counted
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for loop_name in args.loops:
            for name in order:
                with asyncio.Runner(loop_factory=loops[loop_name]) as runner:
                    row = runner.run(one_round(name, args.pages, args.threads, args.budget_us,
                                               store))
                row.update(round=r, loop=loop_name)
                if r:
                    rows.append(row)
                print(f"# round {r} {loop_name:7} {name:10} lat {row['lat_ns'] / 1e3:8.1f} us"
                      f"  wall {row['wall_ns'] / 1e3:8.1f} us/fault  writes {row['ring_writes']}"
                      f"  ioctls {row['ioctls']}", file=sys.stderr, flush=True)
    elapsed = time.monotonic() - t0
    meta = {"kernel": platform.release(), "patched": patched, "pages": args.pages,
            "threads": args.threads, "rounds": args.rounds, "budget_us": args.budget_us,
            "cpus": os.cpu_count(), "elapsed_s": round(elapsed, 1)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"kernel {meta['kernel']}, {args.pages} faults x {args.rounds} rounds per cell, "
          f"{args.threads} faulting thread(s), poll budget {args.budget_us} us; "
          f"medians over rounds, ratio = base / config (higher = faster; base: ioctl, "
          f"native for the native engine's rows)\n")
    print("| loop | config | fault round trip (median) | ratio | wall per fault | ratio |")
    print("|---|---|---|---|---|---|")
    for loop_name in args.loops:
        med: dict[str, tuple[float, float]] = {}
        for name in configs:
            sel = [x for x in rows if x["loop"] == loop_name and x["config"] == name]
            med[name] = (statistics.median(x["lat_ns"] for x in sel),
                         statistics.median(x["wall_ns"] for x in sel))
        for name in configs:
            base = med.get(baseline(name.partition("=")[0]))
            lat, wall = med[name]
            rl = f"{base[0] / lat:.2f}" if base else "-"
            rw = f"{base[1] / wall:.2f}" if base else "-"
            print(f"| {loop_name} | {name} | {lat / 1e3:.1f} us | {rl} | {wall / 1e3:.1f} us "
                  f"| {rw} |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pages", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-us", type=float, default=20.0)
    p.add_argument("--loops", nargs="+", default=["asyncio", "uvloop"],
                   choices=["asyncio", "uvloop"])
    p.add_argument("--configs", nargs="+",
                   default=["ioctl", "ring", "ring+poll", "ioctl+poll", "ring+poll=1000"],
                   help=f"from {', '.join(CONFIGS)}; X+poll=N: poll budget N us")
    p.add_argument("--native-reads", type=int, default=None,
                   help="Pager(native_reads=) of the native configurations (default: the "
                        "Pager's)")
    p.add_argument("--native-budget-us", type=float, default=200.0,
                   help="Pager(native_budget_us=) of the +spin configurations")
    p.add_argument("--json", help="write every round here")
    args = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
