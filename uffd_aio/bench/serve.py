"""The Python contender of the handoff runs: ``ref_handler``'s counterpart.

    python -m uffd_aio.bench.serve --socket PATH [--loop asyncio|uvloop] [--readahead N]
                                   [--cpu N] [--store-bytes N] [--handler async|sync]

Listens on a Unix socket and serves successive clients (``benchmarks/c/build/workload``),
each of which sends its uffd and the Firecracker mapping JSON.  Per client: receive
(:func:`uffd_aio.handoff.receive`), a :class:`~uffd_aio.Pager` on the handed uffd with one
adopted region per mapping (:meth:`Pager.adopt`), the benchmark handler
(:mod:`uffd_aio.bench.store`), until the client hangs up; then one JSON line of pager
statistics on stderr.  All clients share one :class:`~uffd_aio.Ring`.  SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from typing import Any

from uffd_aio import handoff
from uffd_aio.bench.common import LOOPS, loop_factory, pin, quiet_logging
from uffd_aio.bench.store import PatternStore, attach
from uffd_aio.pager import Pager
from uffd_aio.ring import Ring
from uffd_aio.uffd import Userfaultfd


async def _serve_client(conn: socket.socket, ring: Ring, store: PatternStore,
                        args: argparse.Namespace, n: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    h = await handoff.receive(conn)
    uffd = Userfaultfd.from_fd(h.uffd_fd)
    async with Pager(uffd=uffd, ring=ring, name=f"bench-client{n}",
                     max_inflight=args.max_inflight,
                     read_mode=args.read_mode) as pager:
        for i, m in enumerate(h.mappings):
            region = pager.adopt(m.base_host_virt_addr, m.size, store_offset=m.offset,
                                 page_size=m.page_size, name=f"m{i}")
            attach(region, store, args.readahead, sync=args.handler == "sync")
        setup_s = time.perf_counter() - t0
        with contextlib.suppress(OSError):
            while await loop.sock_recv(conn, 4096):  # the client says nothing: wait for EOF
                pass
        st = pager.stats
    conn.close()
    return {"client": n, "peer_pid": h.pid, "mappings": len(h.mappings),
            "setup_ms": round(setup_s * 1e3, 3),
            "faults": st.faults, "duplicate_faults": st.duplicate_faults,
            "handler_calls": st.handler_calls, "copies": st.copies,
            "resolved_pages": st.resolved_pages, "reads": st.reads, "errors": st.errors,
            "eagain_retries": st.eagain_retries, "removes": st.removes,
            "latency_p50_us": round(st.latency.p50_us, 3),
            "latency_mean_us": round(st.latency.mean_us, 3)}


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    store = PatternStore(args.store_bytes)
    ring = Ring(loop=loop)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(args.socket)
    srv.listen(16)
    srv.setblocking(False)
    print(json.dumps({"ready": args.socket, "loop": args.loop, "pid": os.getpid()}),
          file=sys.stderr, flush=True)
    stopper = asyncio.ensure_future(stop.wait())
    n = 0
    try:
        while not stop.is_set():
            acc = asyncio.ensure_future(loop.sock_accept(srv))
            await asyncio.wait([acc, stopper], return_when=asyncio.FIRST_COMPLETED)
            if not acc.done():
                acc.cancel()
                break
            conn, _ = acc.result()
            conn.setblocking(False)
            n += 1
            try:
                out = await _serve_client(conn, ring, store, args, n)
            except Exception as exc:  # report and keep serving the next client
                out = {"client": n, "error": f"{type(exc).__name__}: {exc}"}
                conn.close()
            print(json.dumps(out), file=sys.stderr, flush=True)
            if args.once:
                break
    finally:
        stopper.cancel()
        srv.close()
        ring.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uffd_aio.bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True)
    p.add_argument("--loop", choices=LOOPS, default="asyncio")
    p.add_argument("--readahead", type=int, default=1, metavar="PAGES")
    p.add_argument("--cpu", type=int, default=None, help="pin the whole process to this CPU")
    p.add_argument("--store-bytes", type=int, default=64 << 20,
                   help="pattern bytes to pre-compute (grown on demand)")
    p.add_argument("--handler", choices=("async", "sync"), default="async")
    p.add_argument("--max-inflight", type=int, default=1024)
    p.add_argument("--read-mode", choices=("auto", "read", "multishot", "poll"), default="auto",
                   help="Pager read_mode")
    p.add_argument("--once", action="store_true", help="exit after one client")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.readahead < 1:
        raise SystemExit("--readahead must be >= 1")
    pin(args.cpu)
    quiet_logging()
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        return runner.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
