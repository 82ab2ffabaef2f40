"""The Python contender of the in-process runs: ``benchmarks/c/build/inproc``'s counterpart.

    python -m uffd_aio.bench.inproc [--loop asyncio|uvloop] [--readahead N] [--pages N]
                                    [--threads "1 4 16"] [--order seq|random]
                                    [--page-size 4096|2097152]
                                    [--pin same|split|none] [--label STR]

One process: a :class:`~uffd_aio.Pager` on the loop thread serving an anonymous region
(``pager.map``) with the benchmark handler, and T native threads (``uffd_aio.testing.scan``,
GIL released) touching one word per page, each first touch timed.  Then every word is
verified.  One JSON line per thread count on stdout, with the fields of the C ``inproc``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from uffd_aio import testing
from uffd_aio.bench.common import LOOPS, affinity, loop_factory, percentiles, pin, quiet_logging
from uffd_aio.bench.store import PatternStore, attach
from uffd_aio.pager import Pager

PAGE = 4096


async def run_one(args: argparse.Namespace, store: PatternStore, threads: int) -> dict[str, Any]:
    ps = args.page_size
    length = args.pages * ps
    async with Pager(name="bench-inproc", max_inflight=args.max_inflight,
                     read_mode=args.read_mode, native_reads=args.native_reads,
                     native_budget_us=args.native_budget_us) as pager:
        region = pager.map(length, page_size=ps)
        if args.handler == "native":  # the native engine (C) copies from the same buffer
            region.serve_from(store.buf, readahead=args.readahead)
        else:
            attach(region, store, args.readahead, sync=args.handler == "sync")
        res = await testing.scan(region.address, length, threads=threads, op="read",
                                 order=args.order, latencies=True, page_size=ps)
        bad = await testing.verify(region.address, length)
        st = pager.stats
    lat = res.latencies_ns or []
    out: dict[str, Any] = {"mode": "inproc", "label": args.label, "affinity": affinity(),
                           "pages": args.pages, "page_size": ps, "regions": 1,
                           "threads": threads, "order": args.order, "share": "chunk",
                           "access": "read", "faults_timed": len(lat)}
    out.update({k: round(v, 3) for k, v in percentiles(lat).items()})
    out["wall_s"] = round(res.wall_s, 6)
    out["mib_per_s"] = round(length / (1 << 20) / res.wall_s, 1) if res.wall_s else 0.0
    out["fault_cpu"] = args.fault_cpu
    out["verified"] = bad < 0
    out["bad_offset"] = None if bad < 0 else bad
    out["handler"] = {"loop": args.loop, "readahead": args.readahead, "faults": st.faults,
                      "copies": st.copies, "reads": st.reads,
                      "duplicate_faults": st.duplicate_faults, "errors": st.errors,
                      "native_faults": st.native_faults, "native_reads": st.native_reads,
                      "latency_p50_us": round(st.latency.p50_us, 3)}
    return out


async def run(args: argparse.Namespace) -> int:
    if args.fault_cpu is not None:
        # native scan threads are created by the to_thread worker: pin that worker
        cpu = args.fault_cpu
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=2, initializer=pin, initargs=(cpu,)))
    store = PatternStore(args.pages * args.page_size)
    rc = 0
    for t in args.threads:
        out = await run_one(args, store, t)
        print(json.dumps(out), flush=True)
        rc |= 0 if out["verified"] else 1
    return rc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uffd_aio.bench.inproc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loop", choices=LOOPS, default="asyncio")
    p.add_argument("--readahead", type=int, default=1, metavar="PAGES")
    p.add_argument("--pages", type=int, default=16384)
    p.add_argument("--page-size", type=int, default=PAGE,
                   help="4096, or 2097152 for hugetlbfs pages (reserve them first)")
    p.add_argument("--threads", type=lambda s: [int(x) for x in s.replace(",", " ").split()],
                   default=[1], help='thread counts, e.g. "1 4 16" (one run each)')
    p.add_argument("--order", choices=("seq", "random"), default="seq")
    p.add_argument("--handler-cpu", type=int, default=None, help="pin the loop thread")
    p.add_argument("--fault-cpu", type=int, default=None, help="pin the faulting threads")
    p.add_argument("--handler", choices=("async", "sync", "native"), default="async",
                   help="async/sync: a Python handler; native: region.serve_from (C engine)")
    p.add_argument("--native-reads", type=int, default=16, help="Pager native_reads")
    p.add_argument("--native-budget-us", type=float, default=0.0,
                   help="Pager native_budget_us")
    p.add_argument("--max-inflight", type=int, default=1024)
    p.add_argument("--read-mode", choices=("auto", "read", "multishot", "poll"), default="auto",
                   help="Pager read_mode")
    p.add_argument("--label", default="")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.readahead < 1 or args.pages < 1:
        raise SystemExit("--readahead and --pages must be >= 1")
    pin(args.handler_cpu)
    quiet_logging()
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        return runner.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
