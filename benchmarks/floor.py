#!/usr/bin/env python3
"""The CPython floor of a uffd handler: what a bare Python loop costs per fault.

    .venv/bin/python benchmarks/floor.py [--pages 16384] [--threads 1] [--rounds 5]

No Pager, no asyncio, no io_uring: per handed-over uffd (received with
``uffd_aio.handoff.receive``, the only asyncio part), one blocking loop on the main
thread that does what ``ref_handler`` does, in the fewest Python operations:
``poll`` on the uffd and the client socket, ``readv`` of up to 64 messages,
``struct.iter_unpack``, and one ``UFFDIO_COPY`` (``_lowlevel.uffd_copy``) per fault from a
pre-computed pattern buffer.  Pinned like ``uffd-aio bench --pin same``.  Prints the
workload's p50 per-fault latency and throughput next to ``ref_handler``'s, interleaved.

This bounds what any CPython handler can reach on the machine: the pager's own layers
(io_uring, asyncio, events, dispatch, the async handler) come on top of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import pathlib
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from uffd_aio import handoff, testing
from uffd_aio.bench.common import pin
from uffd_aio.binding import lowlevel as ll

ROOT = pathlib.Path(__file__).resolve().parent
MSG = struct.Struct("<B7xQQI4x")


def serve_loop(fd: int, peer: socket.socket, base: int, size: int, offset: int,
               src0: int, window: int = 1) -> int:
    """ref_handler's loop in Python: returns the number of faults served."""
    buf = bytearray(32 * 64)
    bufs = [buf]
    p = select.poll()
    p.register(fd, select.POLLIN)
    p.register(peer.fileno(), select.POLLIN | select.POLLHUP)
    copy = ll.uffd_copy
    mask = ~4095
    n = 0
    while True:
        for rfd, _ in p.poll():
            if rfd != fd:
                return n
            try:
                got = os.readv(fd, bufs)
            except BlockingIOError:
                continue
            for ev, _flags, addr, _tid in MSG.iter_unpack(memoryview(buf)[:got]):
                if ev != 0x12:
                    continue
                page = addr & mask
                length = min(window * 4096, base + size - page)
                rc, done = copy(fd, page, src0 + offset + (page - base), length, 0)
                if rc and done < 4096:  # a sequential window ran into present pages
                    copy(fd, page, src0 + offset + (page - base), 4096, 0)
                n += 1


async def accept_one(srv: socket.socket) -> tuple[socket.socket, handoff.Handoff]:
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(srv)
    return conn, await handoff.receive(conn)


def python_server(sock_path: str, store_bytes: int, ready: threading.Event,
                  clients: int, window: int) -> None:
    pin(0)
    store = mmap.mmap(-1, store_bytes)  # page-aligned, like ref_handler's snapshot
    testing.pattern_into(memoryview(store), 0)
    src0, keep = ll.buffer_address(store)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(4)
    srv.setblocking(False)
    ready.set()
    for _ in range(clients):
        conn, h = asyncio.run(accept_one(srv))
        m = h.mappings[0]
        os.set_blocking(h.uffd_fd, False)
        serve_loop(h.uffd_fd, conn, m.base_host_virt_addr, m.size, m.offset, src0, window)
        os.close(h.uffd_fd)
        conn.close()
    srv.close()
    del keep


def workload(sock: str, pages: int, threads: int) -> dict[str, float]:
    out = subprocess.run([str(ROOT / "c" / "build" / "workload"), "--socket", sock, "--pages",
                          str(pages), "--threads", str(threads), "--fault-cpu", "0"],
                         capture_output=True, text=True, check=True).stdout
    r: dict[str, float] = json.loads(out)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--readahead", type=int, default=1,
                    help="pages per copy (sequential order only: no served-page bitmap)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="uffd-floor-")
    res: dict[str, list[dict[str, float]]] = {"c": [], "python-floor": []}
    for _ in range(args.rounds):
        csock = os.path.join(tmp, "c.sock")
        h = subprocess.Popen([str(ROOT / "c" / "build" / "ref_handler"), "--cpu", "0",
                              "--readahead", str(args.readahead),
                              "--snapshot-mib", str(max(1, args.pages * 4096 >> 20)), csock],
                             stderr=subprocess.DEVNULL)
        while not os.path.exists(csock):
            time.sleep(0.005)
        res["c"].append(workload(csock, args.pages, args.threads))
        h.terminate()
        h.wait()
        if os.path.exists(csock):  # ref_handler removes its socket on SIGTERM
            os.unlink(csock)
        psock = os.path.join(tmp, "py.sock")
        ready = threading.Event()
        t = threading.Thread(target=python_server,
                             args=(psock, args.pages * 4096, ready, 1, args.readahead),
                             daemon=True)
        t.start()
        ready.wait()
        res["python-floor"].append(workload(psock, args.pages, args.threads))
        t.join()
        os.unlink(psock)
    c50 = statistics.median(r["p50_us"] for r in res["c"])
    for name, rs in res.items():
        p50 = statistics.median(r["p50_us"] for r in rs)
        mib = statistics.median(r["mib_per_s"] for r in rs)
        print(f"{name:<13} T={args.threads} ra {args.readahead}: p50 {p50:6.2f} us "
              f"({p50 / c50:4.2f}x C), {mib:6.1f} MiB/s, "
              f"verified {all(r['verified'] for r in rs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
