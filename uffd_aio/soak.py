"""``uffd-aio soak``: many checked clients against one page server, for a long time.

    uffd-aio soak [--clients N] [--threads T] [--pages P] [--regions R]
                  [--duration S | --faults N] [--readahead POLICY] [--loop asyncio|uvloop]
                  [--socket PATH [--server-pid PID]] [--workload PATH] [--json]

Without ``--socket`` it writes a snapshot file of the benchmarks' pattern, starts
``uffd-aio serve`` on it (a child process, JSON logs parsed) and stops it at the end;
with ``--socket`` it targets a server that is already running (``--server-pid`` lets it
watch that server's RSS and fds).  N client slots each run the benchmarks' C client
(``benchmarks/c/build/workload``: a Firecracker-style VMM stand-in that hands over its uffd,
touches every page from T threads in random order, and checks every word) again and
again, with fresh seeds, until the duration or the number of touched pages is reached.

Reported: client runs, pages touched, faults the server served, wrong bytes, errors
(client exits other than 0, error-level server log lines, handler errors), and the
server's RSS and open fds at the start, at the end (idle, after every client was
released) and at the maximum.  Exit status 1 on any wrong byte, any error, or a leak
trend: more fds at the idle end than at the idle start (``--fd-slack``), or an RSS at the
end more than ``--rss-slack-mib`` above the highest RSS of the first quarter of the run
(the warm-up: imports, buffers and caches grow once).  2 for a setup problem.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from uffd_aio import testing

__all__ = ["SoakReport", "add_arguments", "main"]

PAGE = 4096
ROOT = Path(__file__).resolve().parents[1]


@attrs.define(eq=False)
class _Sample:
    t: float
    rss: int
    fds: int


@attrs.define(eq=False)
class SoakReport:
    """What a soak run saw (printed as one JSON line with ``--json``)."""

    runs: int = 0
    pages_touched: int = 0
    server_faults: int | None = None
    wrong_words: int = 0
    client_failures: int = 0
    server_errors: int = 0
    handler_errors: int = 0
    seconds: float = 0.0
    rss_start: int | None = None
    rss_warm: int | None = None
    rss_end: int | None = None
    rss_max: int | None = None
    fds_start: int | None = None
    fds_end: int | None = None
    fds_max: int | None = None
    leaks: list[str] = attrs.Factory(list)
    first_errors: list[str] = attrs.Factory(list)

    @property
    def ok(self) -> bool:
        return not (self.wrong_words or self.client_failures or self.server_errors
                    or self.handler_errors or self.leaks)

    def note(self, text: str) -> None:
        if len(self.first_errors) < 10:
            self.first_errors.append(text[:500])


def _sample(pid: int) -> _Sample | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError):
        return None
    return _Sample(time.monotonic(), rss, fds)


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _find_workload(path: str | None) -> Path:
    if path:
        return Path(path)
    cdir = ROOT / "benchmarks" / "c"
    exe = cdir / "build" / "workload"
    if not exe.exists() and (cdir / "Makefile").exists() and shutil.which("make"):
        subprocess.run(["make", "-s", "-C", str(cdir), "build/workload"], check=True,
                       timeout=300)
    return exe


def _write_snapshot(path: Path, pages: int) -> None:
    chunk = 256 * PAGE
    with open(path, "wb") as f:
        for off in range(0, pages * PAGE, chunk):
            f.write(testing.pattern_bytes(off, min(chunk, pages * PAGE - off)))


class _Soak:
    def __init__(self, args: argparse.Namespace, workload: Path) -> None:
        self.args = args
        self.workload = workload
        self.report = SoakReport()
        self.samples: list[_Sample] = []
        self.server: asyncio.subprocess.Process | None = None
        self.server_pid: int | None = args.server_pid
        self.served = self.released = 0
        self.children: set[asyncio.subprocess.Process] = set()
        self.rng = random.Random(args.seed)
        self.deadline = 0.0
        self.launched_pages = 0

    # ---- the server --------------------------------------------------------------

    async def start_server(self, tmp: Path) -> str:
        a = self.args
        snap = tmp / "mem.snap"
        await asyncio.to_thread(_write_snapshot, snap, a.pages)
        sock = str(tmp / "uffd.sock")
        backend = a.backend or f"file:{snap}"
        cmd = [sys.executable, "-m", "uffd_aio", "-v", "--log-json", "serve", "--socket", sock,
               "--backend", backend, "--loop", a.loop]
        if a.readahead:
            cmd += ["--readahead", a.readahead]
        self.server = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self.server_pid = self.server.pid
        self._log_task = asyncio.ensure_future(self._read_server_log(self.server))
        async with asyncio.timeout(120):  # start-up is slow on a loaded machine
            while not _exists(sock):
                if self.server.returncode is not None:
                    raise RuntimeError(f"uffd-aio serve exited at start-up "
                                       f"({self.server.returncode})")
                await asyncio.sleep(0.05)
        self.report.server_faults = 0
        return sock

    async def _read_server_log(self, p: asyncio.subprocess.Process) -> None:
        assert p.stderr is not None
        while line := await p.stderr.readline():
            try:
                ev = json.loads(line)
            except ValueError:
                if line.strip() and not line.startswith(b"uffd-aio serve: listening"):
                    self.report.note(f"server: {line.decode(errors='replace').strip()}")
                continue
            if not isinstance(ev, dict):
                continue
            name = ev.get("event")
            if name == "uffd_aio.client_served":
                self.served += 1
            elif name == "uffd_aio.client_released":
                self.released += 1
                assert self.report.server_faults is not None
                self.report.server_faults += int(ev.get("faults", 0))
                errors = int(ev.get("errors", 0))
                if errors:
                    self.report.handler_errors += errors
                    self.report.note(f"server: client {ev.get('client')} had {errors} "
                                     "handler errors")
            if ev.get("level") in ("error", "critical"):
                self.report.server_errors += 1
                self.report.note(f"server: {name} {ev.get('error', '')}")
            if self.args.verbose_server:
                print(line.decode(errors="replace"), end="", file=sys.stderr)

    async def stop_server(self) -> None:
        p = self.server
        if p is None or p.returncode is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                await p.wait()
        except TimeoutError:
            p.kill()
            await p.wait()
            self.report.server_errors += 1
            self.report.note("server: did not exit within 20 s of SIGTERM (killed)")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._log_task
        if p.returncode not in (0, -signal.SIGTERM):
            self.report.server_errors += 1
            self.report.note(f"server: exit status {p.returncode}")

    # ---- sampling ------------------------------------------------------------------

    def sample(self) -> _Sample | None:
        if self.server_pid is None:
            return None
        s = _sample(self.server_pid)
        if s is not None:
            self.samples.append(s)
        return s

    async def sampler(self) -> None:
        while True:
            await asyncio.sleep(self.args.sample_interval)
            self.sample()

    async def settle(self) -> _Sample | None:
        """The idle end: wait (a while) for the server to release every client."""
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    while self.released < self.served:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
        start = self.report.fds_start
        end = self.sample()
        with contextlib.suppress(TimeoutError):  # fds of the last releases close soon after
            async with asyncio.timeout(10):
                while end is not None and start is not None and end.fds > start:
                    await asyncio.sleep(0.1)
                    end = self.sample()
        return end

    # ---- clients --------------------------------------------------------------------

    def budget_left(self) -> bool:
        faults: int | None = self.args.faults
        if faults is not None:
            return self.launched_pages < faults
        return time.monotonic() < self.deadline

    async def client_slot(self, sock: str, slot: int) -> None:
        a = self.args
        while self.budget_left():
            self.launched_pages += a.pages
            seed = self.rng.getrandbits(32)
            cmd = [str(self.workload), "--socket", sock, "--pages", str(a.pages),
                   "--threads", str(a.threads), "--regions", str(a.regions),
                   "--order", "random", "--share", self.rng.choice(["chunk", "interleave"]),
                   "--seed", str(seed), "--timeout", str(a.client_timeout),
                   "--connect-timeout", "10", "--verify", "--label", f"slot{slot}"]
            p = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            self.children.add(p)
            try:
                async with asyncio.timeout(a.client_timeout + 30):
                    out, err = await p.communicate()
            except TimeoutError:
                p.kill()
                out, err = await p.communicate()
            finally:
                self.children.discard(p)
            self.record(p.returncode, out.decode(errors="replace"),
                        err.decode(errors="replace"), seed)

    def record(self, rc: int | None, out: str, err: str, seed: int) -> None:
        r = self.report
        r.runs += 1
        doc: dict[str, Any] = {}
        lines = out.strip().splitlines()
        with contextlib.suppress(ValueError, IndexError):
            doc = json.loads(lines[-1])
        if rc == 0 and doc.get("verified") is True:
            r.pages_touched += int(doc.get("pages", self.args.pages))
            return
        bad = int(doc.get("bad_words", 0) or 0)
        if bad or doc.get("verified") is False:
            r.wrong_words += max(bad, 1)
        else:
            r.client_failures += 1
        what = (f"error {doc['error']} at stage {doc.get('stage')}" if "error" in doc
                else f"verified {doc.get('verified')}, bad words {bad}" if doc
                else f"no report: {out.strip()[-200:]!r}")
        r.note(f"client (seed {seed}): exit {rc}, {what}; stderr: {err.strip()[:200]!r}")

    # ---- the run ----------------------------------------------------------------------

    async def run(self) -> SoakReport:
        a = self.args
        with tempfile.TemporaryDirectory(prefix="uffd-aio-soak-") as tmpdir:
            sock = a.socket or await self.start_server(Path(tmpdir))
            t0 = time.monotonic()
            self.deadline = t0 + (a.duration if a.duration is not None else 30.0)
            first = self.sample()
            sampler = asyncio.ensure_future(self.sampler())
            slots = [asyncio.ensure_future(self.client_slot(sock, i)) for i in range(a.clients)]
            try:
                await asyncio.gather(*slots)
            finally:
                for t in slots:
                    t.cancel()
                for p in list(self.children):
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
                self.report.seconds = round(time.monotonic() - t0, 3)
                if first is not None:
                    self.report.fds_start, self.report.rss_start = first.fds, first.rss
                last = await self.settle()
                await self.stop_server()
        self.summarize(first, last)
        return self.report

    def summarize(self, first: _Sample | None, last: _Sample | None) -> None:
        r, a = self.report, self.args
        if first is None or last is None or not self.samples:
            return
        r.rss_end, r.fds_end = last.rss, last.fds
        r.rss_max = max(s.rss for s in self.samples)
        r.fds_max = max(s.fds for s in self.samples)
        t_end = last.t
        quarter = first.t + (t_end - first.t) / 4
        warm = [s.rss for s in self.samples if s.t <= quarter] or [first.rss]
        r.rss_warm = max(warm)
        if last.fds > first.fds + a.fd_slack:
            r.leaks.append(f"fds: {first.fds} at the start, {last.fds} at the idle end")
        if last.rss > r.rss_warm + a.rss_slack_mib * (1 << 20):
            r.leaks.append(f"rss: {r.rss_warm >> 20} MiB after warm-up, {last.rss >> 20} MiB "
                           f"at the end (slack {a.rss_slack_mib} MiB)")


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / (1 << 20):.1f} MiB"


def print_report(r: SoakReport, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**attrs.asdict(r), "ok": r.ok}), flush=True)
        return
    faults = "?" if r.server_faults is None else str(r.server_faults)
    print(f"soak: {r.runs} client runs in {r.seconds} s, {r.pages_touched} pages touched, "
          f"{faults} faults served")
    print(f"  wrong words (8 bytes) {r.wrong_words}, client failures {r.client_failures}, "
          f"server error lines {r.server_errors}, handler errors {r.handler_errors}")
    print(f"  server RSS start {_mib(r.rss_start)}, after warm-up {_mib(r.rss_warm)}, "
          f"end {_mib(r.rss_end)}, max {_mib(r.rss_max)}")
    print(f"  server fds start {r.fds_start}, end {r.fds_end}, max {r.fds_max}")
    for leak in r.leaks:
        print(f"  LEAK {leak}")
    for e in r.first_errors:
        print(f"  error: {e}")
    print("soak: OK" if r.ok else "soak: FAILED", flush=True)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=_positive, default=4,
                        help="clients running at once (4)")
    parser.add_argument("--threads", type=_positive, default=4,
                        help="faulting threads per client (4)")
    parser.add_argument("--pages", type=_positive, default=4096,
                        help="pages per client run, also the snapshot size (4096)")
    parser.add_argument("--regions", type=_positive, default=2,
                        help="mappings per client (2)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--duration", type=float, metavar="S",
                        help="start clients for S seconds (default 30)")
    budget.add_argument("--faults", type=_positive, metavar="N",
                        help="start clients until N pages were touched (e.g. 1000000)")
    parser.add_argument("--socket", metavar="PATH",
                        help="use a running server instead of starting one")
    parser.add_argument("--server-pid", type=int, metavar="PID",
                        help="with --socket: watch this server's RSS and fds")
    parser.add_argument("--backend", metavar="SPEC",
                        help="the started server's --backend (default: a pattern snapshot "
                             "file; anything else makes wrong bytes, to test the checker)")
    parser.add_argument("--readahead", metavar="POLICY", help="the started server's --readahead")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop",
                        help="the started server's loop")
    parser.add_argument("--workload", metavar="PATH",
                        help="the C client (default benchmarks/c/build/workload, built if "
                             "missing)")
    parser.add_argument("--client-timeout", type=_positive, default=120, metavar="S",
                        help="a client run's alarm: a hung fault fails it (120)")
    parser.add_argument("--fd-slack", type=int, default=0,
                        help="extra server fds tolerated at the idle end (0)")
    parser.add_argument("--rss-slack-mib", type=int, default=64,
                        help="server RSS growth after warm-up tolerated (64 MiB)")
    parser.add_argument("--sample-interval", type=float, default=1.0, metavar="S",
                        help="seconds between RSS/fd samples (1)")
    parser.add_argument("--seed", type=int, help="seed of the clients' seeds")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    parser.add_argument("--verbose-server", action="store_true",
                        help="copy the started server's log lines to stderr")


def main(args: argparse.Namespace) -> int:
    if args.server_pid is not None and args.socket is None:
        print("uffd-aio soak: --server-pid needs --socket", file=sys.stderr)
        return 2
    try:
        workload = _find_workload(args.workload)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"uffd-aio soak: cannot build the C client: {exc}", file=sys.stderr)
        return 2
    if not os.access(workload, os.X_OK):
        print(f"uffd-aio soak: no C client at {workload} (make -C benchmarks/c)",
              file=sys.stderr)
        return 2
    soak = _Soak(args, workload)
    try:
        with asyncio.Runner() as runner:
            report = runner.run(soak.run())
    except (RuntimeError, OSError, TimeoutError) as exc:
        print(f"uffd-aio soak: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print_report(report, as_json=args.json)
    return 0 if report.ok else 1
