#!/usr/bin/env python3
"""Compressed memory: a region backed by zstd-compressed pages, under a resident budget.

What it does:

1. builds a compressible dataset of --size MiB (each page: a unique header
   plus text) and loads it into a CompressedBackend (per-page zstd);
2. maps a region registered MISSING|WP and attaches it with a DirtyTracker
   whose --budget (resident bytes) is smaller than the data, so pages are
   evicted while the workload runs;
3. native worker threads read the whole region, then overwrite the first
   --write-fraction of it with a new pattern: written pages are dirty, and
   evicting them writes them back (compressed) before dropping them;
4. verifies: the written part by native threads (every byte), the rest by
   reading it back through the pager and comparing with the dataset, then
   flushes the remaining dirty pages and checks the compressed store itself;
5. prints evictions, write-backs, peak residency, compression ratio and MiB/s.

    .venv/bin/python examples/compressed_memory/compressed_memory.py
    .venv/bin/python examples/compressed_memory/compressed_memory.py --size 64 --budget 8
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

import structlog

import uffd_aio
from uffd_aio import Mode, testing
from uffd_aio.serving import attach
from uffd_aio.serving.dirty import DirtyTracker
from uffd_aio.stores.compressed import CompressedBackend

MiB = 1 << 20
PS = os.sysconf("SC_PAGE_SIZE")
WRITE_SEED = 0xC0FFEE


def page_content(i: int) -> bytes:
    """Page ``i`` of the dataset: 64 unique bytes, then compressible text."""
    head = bytes(testing.pattern_bytes(i * PS, 64))
    line = f"page {i:09d} of the uffd_aio compressed-memory demo; ".encode()
    body = (line * (PS // len(line) + 1))[:PS - 64]
    return head + body


def dataset(first: int, count: int) -> bytes:
    return b"".join(page_content(i) for i in range(first, first + count))


def line(label: str, text: str) -> None:
    print(f"  {label:<22} {text}")


async def main_async(args: argparse.Namespace) -> int:
    size = args.size * MiB
    budget = args.budget * MiB
    npages = size // PS
    chunk_pages = 4 * MiB // PS

    backend = CompressedBackend(level=args.level)
    t0 = time.perf_counter()
    for first in range(0, npages, chunk_pages):
        n = min(chunk_pages, npages - first)
        backend.load(first * PS, dataset(first, n))
    cs = backend.stats
    print(f"loaded {args.size} MiB into a zstd-{args.level} page store in "
          f"{time.perf_counter() - t0:.2f} s: {cs.compressed_bytes / MiB:.1f} MiB compressed "
          f"(ratio {cs.ratio:.1f}x)")
    print(f"region {args.size} MiB, resident budget {args.budget} MiB, {args.threads} native "
          f"threads\n")

    written = (int(size * args.write_fraction) // MiB) * MiB
    ok = True
    async with uffd_aio.Pager() as pager:
        region = pager.map(size, mode=Mode.MISSING | Mode.WP, name="compressed")
        tracker = DirtyTracker(max_resident=budget)
        att = attach(region, backend, readahead=args.readahead, dirty=tracker)

        r = await testing.scan(region.address, size, threads=args.threads, op="read")
        line("read everything", f"{r.mib_per_s:8.1f} MiB/s   evicted {tracker.evicted_pages} "
             f"pages so far")

        if written:
            r = await testing.scan(region.address, written, threads=args.threads, op="write",
                                   seed=WRITE_SEED)
            line(f"write first {written // MiB} MiB",
                 f"{r.mib_per_s:8.1f} MiB/s   dirty {tracker.dirty_pages} pages, "
                 f"written back {tracker.written_back_pages}")

            r = await testing.scan(region.address, written, threads=args.threads, op="verify",
                                   seed=WRITE_SEED)
            good = r.mismatches == 0
            ok &= good
            line("verify written part", f"{r.mib_per_s:8.1f} MiB/s   " + (
                "every byte ok" if good else f"{r.mismatches} BAD pages at {r.first_mismatch}"))

        # the untouched part: read back through the pager (a worker thread copies, the
        # GIL released) and compare with the dataset
        t0 = time.perf_counter()
        bad = 0
        step = 4 * MiB
        for off in range(written, size, step):
            n = min(step, size - off)
            got = await region.read(off, n)
            if got != dataset(off // PS, n // PS):
                bad += 1
        ok &= bad == 0
        rest = size - written
        line("verify the rest", f"{rest / MiB / max(time.perf_counter() - t0, 1e-9):8.1f} MiB/s"
             "   " + ("every byte ok" if not bad else f"{bad} BAD 4 MiB chunks"))

        flushed = await tracker.flush()
        st = att.stats
        peak = tracker.peak_resident_pages * PS
        await att.aclose()
        pst = pager.stats

    # the store itself now holds exactly what the workload left in memory
    bad = 0
    for off in range(0, size, step):
        n = min(step, size - off)
        data = await backend.fetch(off, n)
        want = (bytes(testing.pattern_bytes(off, n, seed=WRITE_SEED)) if off < written
                else dataset(off // PS, n // PS))
        bad += bytes(data or bytes(n)) != want
    ok &= bad == 0
    line("verify the store", "every page ok" if not bad else f"{bad} BAD 4 MiB chunks")
    cs = backend.stats
    print()
    line("faults", f"{pst.faults} ({st.wp_faults} write-protect), {st.fetches} fetches, "
         f"{st.pages_fetched} pages fetched")
    line("eviction", f"{tracker.evicted_pages} pages evicted in {tracker.eviction_batches} "
         f"batches ({tracker.evict_seconds:.2f} s), {tracker.written_back_pages} written back "
         f"({flushed} at the final flush)")
    line("residency", f"peak {peak / MiB:.1f} MiB for a {args.budget} MiB budget "
         f"({args.size} MiB of data)")
    line("store", f"{cs.compressed_bytes / MiB:.1f} MiB compressed, ratio {cs.ratio:.1f}x, "
         f"{cs.stores} stores")
    line("result", "OK: every byte verified" if ok else "FAILED")
    await backend.aclose()
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Compressed memory: a region backed by zstd-compressed pages with a "
        "resident budget smaller than the data; writes are tracked and written back on "
        "eviction; everything verified.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="data and region size in MiB")
    p.add_argument("--budget", type=int, default=64, help="resident budget in MiB")
    p.add_argument("--write-fraction", type=float, default=0.5,
                   help="fraction of the region the workload overwrites")
    p.add_argument("--threads", type=int, default=4, help="native worker threads")
    p.add_argument("--readahead", default="adaptive:32", help="off, N, adaptive, adaptive:MAX")
    p.add_argument("--level", type=int, default=3, help="zstd level")
    p.add_argument("-v", "--verbose", action="store_true", help="show the pager's info logs")
    args = p.parse_args(argv)
    if args.size <= 0 or args.budget <= 0 or args.threads <= 0:
        p.error("--size, --budget and --threads must be positive")
    if not 0 <= args.write_fraction <= 1:
        p.error("--write-fraction must be between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(
        logging.INFO if args.verbose else logging.WARNING))
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
