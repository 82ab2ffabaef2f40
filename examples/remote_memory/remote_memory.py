#!/usr/bin/env python3
"""Remote memory in Redis: a region whose pages fault in from a Redis server.

What it does:

1. starts a private redis-server on a free port of 127.0.0.1 in a temporary
   directory (Debian's /usr/bin/redis-server; or use --redis-url);
2. loads a dataset of --size MiB into it, one Redis string per 4 KiB page
   (key ``PREFIX + page index``), with a deterministic, verifiable content;
3. for each read-ahead setting (default: off, then adaptive): maps an empty
   region, attaches it to the Redis backend (uffd_aio.serving.attach), and
   runs native worker threads (uffd_aio.testing.scan) that read every page:
   each first touch is a page fault served by an asyncio handler that GETs
   the page (or MGETs a whole read-ahead window in one round trip);
4. verifies every byte the threads read and prints faults, Redis round
   trips, MiB/s and fault latency for each setting.

The workers are native threads: Python code touching the region while
holding the GIL would deadlock the pager (docs/gil.md).

    .venv/bin/python examples/remote_memory/remote_memory.py            # 256 MiB
    .venv/bin/python examples/remote_memory/remote_memory.py --size 64 --readahead off,16,adaptive
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from typing import Any

import structlog
from redis_local import LocalRedis, RedisUnavailable

import uffd_aio
from uffd_aio import testing
from uffd_aio.serving import attach
from uffd_aio.serving.readahead import policy_from
from uffd_aio.stores.remote import RedisBackend

MiB = 1 << 20
PS = os.sysconf("SC_PAGE_SIZE")


async def load_dataset(backend: RedisBackend, size: int, seed: int) -> float:
    """Put ``size`` bytes of pattern in Redis; seconds it took."""
    t0 = time.perf_counter()
    chunk = 16 * MiB
    show = testing.progress_printer("loading")
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        await backend.load(off, testing.pattern_bytes(off, n, seed=seed))
        show((off + n) // PS, size // PS)
    return time.perf_counter() - t0


async def run_pass(backend: RedisBackend, size: int, *, readahead: str, threads: int,
                   order: testing.Order, seed: int, progress: bool) -> dict[str, Any]:
    batches0, requests0 = backend.batches, backend.requests
    async with uffd_aio.Pager() as pager:
        region = pager.map(size, name="remote")
        att = attach(region, backend, readahead=readahead)
        show = testing.progress_printer(f"read-ahead {readahead}") if progress else None
        res = await testing.scan(region.address, size, threads=threads, op="verify",
                                 order=order, seed=seed, progress=show, progress_interval=0.1)
        if show is not None:
            show(res.pages, res.pages)
        await att.aclose()
        st, ast = pager.stats, att.stats
    return {
        "readahead": readahead, "faults": st.faults, "fetches": ast.fetches,
        # with coalescing, concurrent fetches share one MGET: count what went to Redis
        "round_trips": (backend.batches - batches0) if backend.coalesce
        else (backend.requests - requests0),
        "pages_per_fetch": ast.pages_fetched / ast.fetches if ast.fetches else 0.0,
        "hits": ast.readahead_hits, "wall_s": res.wall_s, "mib_s": size / MiB / res.wall_s,
        "p50_us": st.latency.p50_us, "p99_us": st.latency.p99_us,
        "mismatches": res.mismatches, "first_bad": res.first_mismatch, "errors": st.errors,
    }


async def main_async(args: argparse.Namespace) -> int:
    size = args.size * MiB
    server: LocalRedis | None = None
    try:
        if args.redis_url:
            url = args.redis_url
            print(f"using Redis at {url}")
        else:
            server = LocalRedis(maxmemory=None).start()
            url = server.url
            print(f"started redis-server on 127.0.0.1:{server.port} (data in {server.directory})")
        sep = "&" if "?" in url else "?"
        backend = await RedisBackend.open(f"{url}{sep}prefix={args.prefix}")
        try:
            await backend.ping()
            if not args.no_load:
                secs = await load_dataset(backend, size, args.seed)
                mem = f", Redis used_memory {server.used_memory() / MiB:.0f} MiB" if server else ""
                print(f"loaded {args.size} MiB = {size // PS} pages of {PS} bytes in "
                      f"{secs:.2f} s ({args.size / secs:.0f} MiB/s){mem}")
            print(f"workload: {args.threads} native threads read and verify every byte "
                  f"({args.order} order), faults served from Redis by an asyncio handler "
                  f"on {args.loop}\n")
            results = []
            for ra in args.readahead.split(","):
                policy_from(ra)  # validate early
                results.append(await run_pass(backend, size, readahead=ra, threads=args.threads,
                                              order=args.order, seed=args.seed,
                                              progress=not args.no_progress))
            if not args.keep and not args.no_load:
                await backend.delete_all()
        finally:
            await backend.aclose()
    finally:
        if server is not None:
            server.close()

    ok = True
    print(f"\n  {'read-ahead':>14} {'faults':>8} {'fetches':>8} {'pages/fetch':>11} "
          f"{'Redis MGETs':>11} {'MiB/s':>8} {'fault p50':>10} {'p99':>9}  verified")
    for r in results:
        good = r["mismatches"] == 0 and r["errors"] == 0
        ok &= good
        verdict = "yes, every byte" if good else (
            f"NO: {r['mismatches']} bad pages (first at offset {r['first_bad']}), "
            f"{r['errors']} errors")
        print(f"  {r['readahead']:>14} {r['faults']:8d} {r['fetches']:8d} "
              f"{r['pages_per_fetch']:11.1f} {r['round_trips']:11d} {r['mib_s']:8.1f} "
              f"{r['p50_us']:8.0f}us "
              f"{r['p99_us']:7.0f}us  {verdict}")
    if len(results) > 1 and results[0]["mib_s"]:
        print(f"\n  read-ahead {results[-1]['readahead']} vs {results[0]['readahead']}: "
              f"{results[-1]['mib_s'] / results[0]['mib_s']:.1f}x the throughput, "
              f"{results[0]['round_trips'] / max(results[-1]['round_trips'], 1):.0f}x fewer "
              "round trips to Redis")
    print("  fetches: backend requests (one per fault that was not a read-ahead hit); Redis "
          "MGETs: round trips\n  (concurrent fetches share one MGET); fault p50/p99: fault "
          "arrival to resolution (log2 buckets);\n  MiB/s: region size / scan wall time")
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Remote memory in Redis: a region whose pages fault in from a local "
        "redis-server, read by native threads, every byte verified; compares read-ahead "
        "settings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="dataset and region size in MiB")
    p.add_argument("--threads", type=int, default=4, help="native worker threads")
    p.add_argument("--readahead", default="off,adaptive",
                   help="comma-separated read-ahead settings to run, in order: off, N (fixed "
                   "window of N pages), adaptive, adaptive:MAX")
    p.add_argument("--order", choices=["seq", "random"], default="seq",
                   help="page order of each worker thread")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument("--redis-url", default=None,
                   help="use this Redis (redis://host:port/db, redis+cluster://host:port) "
                   "instead of starting a private redis-server")
    p.add_argument("--prefix", default="uffd-demo:", help="Redis key prefix of the pages")
    p.add_argument("--seed", type=lambda s: int(s, 0), default=testing.DEFAULT_SEED,
                   help="content seed")
    p.add_argument("--no-load", action="store_true",
                   help="do not load the dataset (it is already in --redis-url)")
    p.add_argument("--keep", action="store_true", help="leave the dataset in Redis")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="show the pager's info logs")
    args = p.parse_args(argv)
    if args.size <= 0 or args.threads <= 0:
        p.error("--size and --threads must be positive")
    for ra in args.readahead.split(","):
        try:
            policy_from(ra)
        except ValueError as exc:
            p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(
        logging.INFO if args.verbose else logging.WARNING))
    try:
        if args.loop == "uvloop":
            import uvloop
            return uvloop.run(main_async(args))
        return asyncio.run(main_async(args))
    except RedisUnavailable as exc:
        print(f"remote_memory: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
