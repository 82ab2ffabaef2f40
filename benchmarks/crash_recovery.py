"""Measure the longest fault stall of clients across a server crash or a live upgrade.

    .venv/bin/python benchmarks/crash_recovery.py --mode kill      # SIGKILL + restart
    .venv/bin/python benchmarks/crash_recovery.py --mode takeover  # uffd-aio serve --takeover

Starts ``uffd-aio serve --state-dir`` on a pattern snapshot, runs N checked C clients
(``benchmarks/c/build/workload``: hands over its uffd, touches every page from T threads,
verifies every word), and while they fault either SIGKILLs the server and starts a new one
on the same state directory, or starts a second one with ``--takeover``.  Every client
must exit 0 with every byte verified.  Reported per client: its longest single fault
(``max_us``, measured by the client around each first touch), p99 and wall time; and the
longest of them all: the stall a faulting thread saw across the event.  Prints one JSON
line with ``--json``.  Exit status 1 when a client failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uffd_aio import testing  # noqa: E402

PAGE = 4096


LOG: list[str] = []
DRAINS: list[asyncio.Future[None]] = []


async def _server(python: str, sock: str, snap: Path, state: Path, *extra: str
                  ) -> asyncio.subprocess.Process:
    p = await asyncio.create_subprocess_exec(
        python, "-m", "uffd_aio", "-v", "serve", "--socket", sock, "--backend", f"file:{snap}",
        "--state-dir", str(state), "--keeper-idle", "2", *extra,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert p.stderr is not None
    while True:  # "listening on ..." once it serves
        line = await asyncio.wait_for(p.stderr.readline(), 60)
        LOG.append(f"[{p.pid}] {line.decode(errors='replace').rstrip()}")
        if not line:
            print("\n".join(LOG[-40:]), file=sys.stderr)
            raise RuntimeError(f"uffd-aio serve exited at start-up ({await p.wait()})")
        if b"listening on" in line:
            DRAINS.append(asyncio.ensure_future(_drain(p)))
            return p


async def _drain(p: asyncio.subprocess.Process) -> None:
    assert p.stderr is not None
    while line := await p.stderr.readline():
        LOG.append(f"[{p.pid}] {line.decode(errors='replace').rstrip()}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    python = sys.executable
    workload = ROOT / "benchmarks" / "c" / "build" / "workload"
    with tempfile.TemporaryDirectory(prefix="uffd-crash-") as tmp:
        t = Path(tmp)
        snap = t / "mem.snap"
        pages = args.pages
        snap.write_bytes(testing.pattern_bytes(0, pages * PAGE))
        sock, state = str(t / "uffd.sock"), t / "state"
        procs: list[asyncio.subprocess.Process] = []
        server = await _server(python, sock, snap, state)
        clients = []
        try:
            for i in range(args.clients):
                clients.append(await asyncio.create_subprocess_exec(
                    str(workload), "--socket", sock, "--pages", str(pages), "--threads",
                    str(args.threads), "--regions", "2", "--order", "random", "--seed",
                    str(i + 1), "--timeout", "120", stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE))
            await asyncio.sleep(args.after)
            t0 = time.monotonic()
            if args.mode == "kill":
                server.send_signal(signal.SIGKILL)
                await server.wait()
                server = await _server(python, sock, snap, state)
            else:
                new = await _server(python, sock, snap, state, "--takeover")
                await asyncio.wait_for(server.wait(), 30)
                server = new
            event_s = time.monotonic() - t0
            results = []
            for c in clients:
                out, _ = await asyncio.wait_for(c.communicate(), 150)
                line = out.decode().strip().splitlines()[-1] if out.strip() else "{}"
                doc = json.loads(line)
                results.append({"rc": c.returncode, "verified": doc.get("verified"),
                                "max_us": doc.get("max_us"), "p99_us": doc.get("p99_us"),
                                "wall_s": doc.get("wall_s"), "error": doc.get("error")})
        finally:
            for p in [*clients, server, *procs]:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    await p.wait()
            pidfile = state / "fdkeeper.pid"
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
    ok = all(r["rc"] == 0 and r["verified"] is True for r in results)
    if not ok or args.log:
        print("\n".join(LOG[-80:]), file=sys.stderr)
    return {"mode": args.mode, "clients": args.clients, "threads": args.threads,
            "pages_per_client": pages, "event_after_s": args.after,
            "event_seconds": round(event_s, 3), "ok": ok,
            "longest_stall_ms": round(max((r["max_us"] or 0) for r in results) / 1e3, 1),
            "per_client": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["kill", "takeover"], default="kill")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--pages", type=int, default=16384, help="per client (16384 = 64 MiB)")
    ap.add_argument("--after", type=float, default=0.5,
                    help="seconds after the clients start (they are faulting then)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--log", action="store_true", help="print the servers' last log lines")
    args = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "benchmarks" / "c"), "build/workload"],
                   check=True)
    r = asyncio.run(run(args))
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['mode']}: {r['clients']} clients x {r['threads']} threads, "
              f"{r['pages_per_client']} pages each; event {r['event_after_s']} s in, "
              f"took {r['event_seconds']} s")
        for i, c in enumerate(r["per_client"]):
            print(f"  client {i}: rc {c['rc']} verified {c['verified']} max fault "
                  f"{(c['max_us'] or 0) / 1e3:.1f} ms p99 {c['p99_us']} us wall {c['wall_s']} s"
                  + (f" error {c['error']}" if c["error"] else ""))
        print(f"  longest fault stall: {r['longest_stall_ms']} ms; all verified: {r['ok']}")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
