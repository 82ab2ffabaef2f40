"""``uffd-aio bench``: uffd_aio (asyncio, uvloop) against the C reference handler, one run.

Interleaved rounds: in every round, for every read-ahead window, each contender in turn
(rotated per round) serves the same workloads:

* ``handoff``: ``benchmarks/c/build/workload`` (the VMM side) makes the uffd and hands it
  over a Unix socket to ``ref_handler`` (C) or ``python -m uffd_aio.bench.serve`` (Pager on
  asyncio / uvloop), then touches every page from T threads;
* ``inproc``: ``benchmarks/c/build/inproc`` (handler thread) or
  ``python -m uffd_aio.bench.inproc`` (Pager on the loop, native threads faulting).

Contenders: ``c``; ``asyncio`` and ``uvloop`` (the Python handler, ``--handler``);
``native`` and ``native-uvloop`` (the same Pager with ``region.serve_from(buffer)``:
faults served by the native engine in C; in-process runs only); ``serve-file`` and
``serve-file-py`` (handoff runs only: the real ``uffd-aio serve --backend file:SNAP``
on uvloop, the snapshot a pattern file in the page cache, served by the native engine
or with ``--no-native`` by the Python path).

Ratios to the C handler are medians over the rounds of the same run.  Pinning
(``--pin``) is the one of ``benchmarks/c/smoke.sh``: ``same`` puts the handler and the
faulting threads on one CPU (the stable floor on 2 vCPUs), ``split`` on two, ``none``
leaves it to the scheduler.  Both sides copy from a pre-computed pattern buffer (C:
``--snapshot-mib``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from uffd_aio.bench import report

CONTENDERS = ("c", "asyncio", "uvloop", "native", "native-uvloop", "serve-file",
              "serve-file-py")
DEFAULT_CONTENDERS = ("c", "asyncio", "uvloop", "native")
#: contender -> (loop, handler) of python -m uffd_aio.bench.inproc; None: --handler
_PY_CONTENDERS: dict[str, tuple[str, str | None]] = {
    "asyncio": ("asyncio", None), "uvloop": ("uvloop", None),
    "native": ("asyncio", "native"), "native-uvloop": ("uvloop", "native")}
INPROC_ONLY = ("native", "native-uvloop")
#: ``uffd-aio serve --backend file:SNAP`` (native engine / --no-native)
SERVE_CONTENDERS = ("serve-file", "serve-file-py")
MODES = ("handoff", "inproc")
PAGE = 4096
README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.replace(",", " ").split()]


def _names(allowed: tuple[str, ...]) -> Any:
    def parse(s: str) -> list[str]:
        out = [x for x in s.replace(",", " ").split()]
        bad = [x for x in out if x not in allowed]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return out

    return parse


def _repo_root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (p.description or "") + "\n\n" + (__doc__ or "").split("\n\n", 1)[1]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--workingset", action="store_true",
                   help="instead of the matrix: the working-set replay benchmark (no prefetch, "
                        "read-ahead, order replay, set replay, set + fill; "
                        "uffd_aio.bench.workingset); with --quick, --rounds, --cold")
    p.add_argument("--cold", action="store_true",
                   help="--workingset: evict the snapshot from the page cache before each run")
    p.add_argument("--quick", action="store_true",
                   help="16 MiB per run instead of 64 (< 1 minute)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 5)")
    p.add_argument("--pages", type=int, default=None, help="4 KiB pages per run (16384)")
    p.add_argument("--threads", type=_ints, default=None, help='faulting threads ("1 4 16")')
    p.add_argument("--readahead", type=_ints, default=None, help='windows ("1 16 64")')
    p.add_argument("--orders", type=_names(("seq", "random")), default=None,
                   help='touch orders ("seq"; "seq random")')
    p.add_argument("--modes", type=_names(MODES), default=None,
                   help='"handoff inproc" (default both)')
    p.add_argument("--contenders", type=_names(CONTENDERS), default=list(DEFAULT_CONTENDERS),
                   help=f'"{" ".join(DEFAULT_CONTENDERS)}" (also: native-uvloop, '
                        'serve-file, serve-file-py)')
    p.add_argument("--pin", choices=("same", "split", "none"), default="same",
                   help="CPU placement as benchmarks/c/smoke.sh PIN (default same)")
    p.add_argument("--handler", choices=("async", "sync"), default="async",
                   help="Python fault handler flavour (default async def)")
    p.add_argument("--timeout", type=int, default=60, help="per-run watchdog, seconds")
    p.add_argument("--c-dir", default=None, help="benchmarks/c (built with make if needed)")
    p.add_argument("--out", default=None, help="results directory (benchmarks/results)")
    p.add_argument("--plots-dir", default=None, help="PNG directory (<out>/plots)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--update-readme", metavar="PATH", default=None,
                   help=f"replace the text between {README_BEGIN} and {README_END} in PATH "
                        "with the summary")


# ---- processes -----------------------------------------------------------------------


class Harness:
    def __init__(self, args: argparse.Namespace, cdir: pathlib.Path, tmp: pathlib.Path,
                 logdir: pathlib.Path) -> None:
        self.args = args
        self.bin = cdir / "build"
        self.tmp = tmp
        self.logdir = logdir
        pin = args.pin
        self.hcpu: int | None = None if pin == "none" else 0
        self.fcpu: int | None = None if pin == "none" else (0 if pin == "same" else 1)
        self.store_mib = (args.pages * PAGE + (1 << 20) - 1) >> 20
        self._snapshot: pathlib.Path | None = None

    def snapshot(self) -> pathlib.Path:
        """The pattern snapshot file of the serve-file contenders (written once: it stays
        in the page cache, as the C handler's pre-computed buffer stays in memory)."""
        if self._snapshot is None:
            from uffd_aio.testing import pattern_bytes

            path = self.tmp / "mem.snap"
            path.write_bytes(pattern_bytes(0, self.args.pages * PAGE))
            self._snapshot = path
        return self._snapshot

    # handlers for the handoff mode
    def start_handler(self, contender: str, ra: int) -> tuple[subprocess.Popen[bytes], str]:
        sock = str(self.tmp / f"{contender}-ra{ra}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        if contender == "c":
            cmd = [str(self.bin / "ref_handler"), "--readahead", str(ra), "--snapshot-mib",
                   str(self.store_mib)]
            if self.hcpu is not None:
                cmd += ["--cpu", str(self.hcpu)]
            cmd.append(sock)
        elif contender in SERVE_CONTENDERS:
            cmd = [sys.executable, "-m", "uffd_aio", "serve", "--socket", sock, "--backend",
                   f"file:{self.snapshot()}", "--readahead", str(ra), "--loop", "uvloop"]
            if contender == "serve-file-py":
                cmd.append("--no-native")
        else:
            cmd = [sys.executable, "-m", "uffd_aio.bench.serve", "--socket", sock, "--loop",
                   contender, "--readahead", str(ra), "--store-bytes",
                   str(self.args.pages * PAGE), "--handler", self.args.handler]
            if self.hcpu is not None:
                cmd += ["--cpu", str(self.hcpu)]
        log = open(self.logdir / f"handler-{contender}-ra{ra}.log", "ab")  # noqa: SIM115
        cpu = self.hcpu if contender in SERVE_CONTENDERS else None  # others: --cpu
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                preexec_fn=None if cpu is None else
                                (lambda: os.sched_setaffinity(0, {cpu})))
        log.close()
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"handler {cmd} did not start (see {log.name})")
            time.sleep(0.005)
        return proc, sock

    @staticmethod
    def stop_handler(proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _run(self, cmd: list[str]) -> list[dict[str, Any]]:
        try:
            cp = subprocess.run(cmd, capture_output=True, timeout=self.args.timeout + 15,
                                stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return [{"error": "harness timeout", "cmd": cmd}]
        out = []
        for line in cp.stdout.decode(errors="replace").splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"error": "bad json", "line": line})
        if cp.returncode != 0:
            err = cp.stderr.decode(errors="replace")[-400:]
            if not out:
                out.append({"error": f"exit {cp.returncode}", "stderr": err})
            for r in out:
                r.setdefault("error", f"exit {cp.returncode}")
                r.setdefault("stderr", err)
        return out

    def workload(self, sock: str, threads: int, order: str, label: str) -> dict[str, Any]:
        cmd = [str(self.bin / "workload"), "--socket", sock, "--pages", str(self.args.pages),
               "--threads", str(threads), "--order", order, "--timeout", str(self.args.timeout),
               "--label", label]
        if self.fcpu is not None:
            cmd += ["--fault-cpu", str(self.fcpu)]
        out = self._run(cmd)
        return out[0] if out else {"error": "no output", "cmd": cmd}

    def inproc(self, contender: str, ra: int, threads: list[int], order: str,
               label: str) -> list[dict[str, Any]]:
        if contender == "c":
            out = []
            for t in threads:
                cmd = [str(self.bin / "inproc"), "--pages", str(self.args.pages), "--threads",
                       str(t), "--order", order, "--readahead", str(ra), "--snapshot-mib",
                       str(self.store_mib), "--timeout", str(self.args.timeout), "--label",
                       label]
                if self.hcpu is not None:
                    cmd += ["--handler-cpu", str(self.hcpu), "--fault-cpu", str(self.fcpu)]
                r = self._run(cmd)
                out.append(r[0] if r else {"error": "no output", "threads": t})
            return out
        loop, handler = _PY_CONTENDERS[contender]
        cmd = [sys.executable, "-m", "uffd_aio.bench.inproc", "--loop", loop, "--readahead",
               str(ra), "--pages", str(self.args.pages), "--threads",
               " ".join(map(str, threads)), "--order", order, "--handler",
               handler or self.args.handler, "--label", label]
        if self.hcpu is not None:
            cmd += ["--handler-cpu", str(self.hcpu), "--fault-cpu", str(self.fcpu)]
        out = self._run(cmd)
        got = {r.get("threads") for r in out}
        out += [{"error": "missing", "threads": t} for t in threads if t not in got]
        return out


# ---- machine state ---------------------------------------------------------------------


def machine_state() -> dict[str, Any]:
    st: dict[str, Any] = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    with contextlib.suppress(OSError):
        st["cpu_pressure"] = pathlib.Path("/proc/pressure/cpu").read_text().splitlines()[0]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        st["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True,
                                      timeout=5).stdout.strip()
    return st


def _git(*a: str) -> str:
    try:
        return subprocess.run(["git", *a], capture_output=True, text=True, timeout=10,
                              cwd=_repo_root()).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _versions() -> dict[str, str]:
    v = {"python": platform.python_version(), "kernel": platform.release()}
    for mod in ("uvloop", "cffi"):
        with contextlib.suppress(ImportError, AttributeError):
            v[mod] = __import__(mod).__version__
    return v


# ---- main -----------------------------------------------------------------------------------


def _defaults(args: argparse.Namespace) -> None:
    q = args.quick
    args.rounds = args.rounds or 5
    args.pages = args.pages or (4096 if q else 16384)
    args.threads = args.threads or [1, 4, 16]
    args.readahead = args.readahead or [1, 16, 64]
    args.orders = args.orders or ["seq"]
    args.modes = args.modes or list(MODES)


def _ensure_c(cdir: pathlib.Path) -> None:
    need = [cdir / "build" / p for p in ("ref_handler", "workload", "inproc")]
    if all(p.exists() for p in need):
        return
    print(f"building the C reference: make -C {cdir}", file=sys.stderr)
    subprocess.run(["make", "-s", "-C", str(cdir)], check=True)


def _progress(i: int, total: int, t0: float, r: dict[str, Any]) -> None:
    el = time.monotonic() - t0
    eta = el / i * (total - i) if i else 0.0
    if r.get("error"):
        what = f"ERROR {r['error']}"
    else:
        what = (f"p50 {r['p50_us']:8.2f} us  mean {r['mean_us']:8.2f} us  "
                f"{r['mib_per_s']:7.1f} MiB/s" + ("" if r.get("verified", True) else
                                                    "  NOT VERIFIED"))
    print(f"[{i:3d}/{total}] r{r['round']} ra{r['readahead']:<2} {r['contender']:<7} "
          f"{r['mode']:<7} T{r.get('threads', '?'):<2} {r.get('order', ''):<6} {what}  "
          f"({el:4.0f}s, eta {eta:3.0f}s)", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    if args.workingset:
        from uffd_aio.bench import workingset

        argv = ["--quick"] if args.quick else []
        if args.rounds is not None:
            argv += ["--repeats", str(args.rounds)]
        if args.cold:
            argv.append("--cold")
        return workingset.main(argv)
    _defaults(args)
    root = _repo_root()
    cdir = pathlib.Path(args.c_dir) if args.c_dir else root / "benchmarks" / "c"
    if not (cdir / "Makefile").exists():
        print(f"uffd-aio bench: no C reference at {cdir} (use --c-dir)", file=sys.stderr)
        return 2
    _ensure_c(cdir)
    outdir = pathlib.Path(args.out) if args.out else root / "benchmarks" / "results"
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    rundir = outdir / f"bench-{stamp}"
    rundir.mkdir(parents=True, exist_ok=True)
    plots_dir = pathlib.Path(args.plots_dir) if args.plots_dir else rundir / "plots"
    want_plots = not args.no_plots
    if want_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("uffd-aio bench: matplotlib is not installed, no plots this time "
                  "(pip install 'uffd-aio[plots]')", file=sys.stderr)
            want_plots = False

    contenders = list(args.contenders)
    argv = sys.argv[1:]
    meta: dict[str, Any] = {
        "command": "uffd-aio " + " ".join(argv) if argv[:1] == ["bench"] else "uffd-aio bench",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "uffd_aio")),
        "versions": _versions(), "cpus": os.cpu_count(),
        "pin": args.pin, "rounds": args.rounds, "pages": args.pages, "threads": args.threads,
        "readahead": args.readahead, "orders": args.orders, "modes": args.modes,
        "contenders": contenders, "handler": args.handler,
        "content": f"pattern, pre-computed (C: --snapshot-mib), {args.pages * PAGE >> 20} MiB",
        "before": machine_state(),
    }
    per_round = 0
    for _ in args.readahead:
        for c in contenders:
            modes = [m for m in args.modes if (m == "inproc" and c not in SERVE_CONTENDERS)
                     or (m == "handoff" and c not in INPROC_ONLY)]
            per_round += len(args.orders) * len(args.threads) * len(modes)
    total = per_round * args.rounds
    print(f"uffd-aio bench: {args.rounds} rounds x {per_round} runs, pin={args.pin}, "
          f"{args.pages} pages, load {meta['before']['loadavg']} -> {rundir}",
          file=sys.stderr, flush=True)
    runs: list[dict[str, Any]] = []
    t0 = time.monotonic()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="uffd-bench-"))
    h = Harness(args, cdir, tmp, rundir)
    n = 0

    def record(r: dict[str, Any], rnd: int, contender: str, ra: int, mode: str) -> None:
        nonlocal n
        r.update(contender=contender, round=rnd, readahead=ra, pin=args.pin)
        r.setdefault("mode", mode)
        r["mode"] = mode
        runs.append(r)
        n += 1
        _progress(n, total, t0, r)

    def handoff_runs(rnd: int, contender: str, ra: int, label: str) -> None:
        try:
            proc, sock = h.start_handler(contender, ra)
        except (OSError, RuntimeError) as exc:  # recorded as failed runs; go on
            for order in args.orders:
                for t in args.threads:
                    record({"error": f"handler: {exc}", "threads": t, "order": order}, rnd,
                           contender, ra, "handoff")
            return
        try:
            for order in args.orders:
                for t in args.threads:
                    r = h.workload(sock, t, order, label)
                    r.setdefault("threads", t)
                    r.setdefault("order", order)
                    record(r, rnd, contender, ra, "handoff")
        finally:
            h.stop_handler(proc)

    try:
        for rnd in range(1, args.rounds + 1):
            rot = (rnd - 1) % len(contenders)
            order_c = contenders[rot:] + contenders[:rot]
            for ra in args.readahead:
                for contender in order_c:
                    label = f"{contender}-ra{ra}-{args.pin}"
                    if "handoff" in args.modes and contender not in INPROC_ONLY:
                        handoff_runs(rnd, contender, ra, label)
                    if "inproc" in args.modes and contender not in SERVE_CONTENDERS:
                        for order in args.orders:
                            for r in h.inproc(contender, ra, args.threads, order, label):
                                r.setdefault("order", order)
                                record(r, rnd, contender, ra, "inproc")
    except KeyboardInterrupt:
        print("interrupted: summarizing what ran", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta["after"] = machine_state()
    meta["elapsed_s"] = round(time.monotonic() - t0, 1)

    summary = report.summarize(runs)
    tgt = report.targets(summary, contenders)
    paired = {f"{k[0]}/{k[1]}/T{k[2]}/ra{k[3]}/{c}": round(v, 3)
              for (k, c), v in report.paired_ratios(runs, "p50_us").items()}
    paired_thr = {f"{k[0]}/{k[1]}/T{k[2]}/ra{k[3]}/{c}": round(v, 3)
                  for (k, c), v in report.paired_ratios(runs, "mib_per_s").items()}
    head, rows = report.table_rows(summary, contenders)
    failures = [r for r in runs if r.get("error") or r.get("verified") is False]
    load = (f"load {meta['before']['loadavg']} before, {meta['after']['loadavg']} after; "
            f"{meta['after'].get('cpu_pressure', '')}")

    print()
    print(f"medians of {args.rounds} rounds, pin={args.pin}, {args.pages} pages; {load}")
    print("(x = ratio to the C handler in this run: p50 lower is better, MiB/s higher is "
          "better; with ra > 1 the p50 is a non-faulting touch, compare MiB/s)")
    print(report.text_table(head, rows))
    print()
    print(report.targets_text(tgt))
    if args.pages < 16384:
        print(f"(runs of {args.pages * PAGE >> 20} MiB: read-ahead runs last a few ms, so the "
              "throughput verdicts are rough; the README's come from 64 MiB runs)")
    if failures:
        print(f"\n{len(failures)} failed run(s): see {rundir / 'results.json'}")

    plots: list[str] = []
    title = f"uffd-aio bench {meta['started']} pin={args.pin} rounds={args.rounds}"
    if want_plots and summary:
        plots = report.plot(summary, contenders, str(plots_dir), title)
        print("plots: " + ", ".join(plots))

    md = [f"Command: `{meta['command']}` ({meta['started']}, git {meta['git']}"
          f"{' + local changes' if meta['git_dirty'] else ''}, {meta['elapsed_s']} s).",
          "",
          f"Machine: {meta['cpus']} CPUs, kernel {meta['versions']['kernel']}, Python "
          f"{meta['versions']['python']}, uvloop {meta['versions'].get('uvloop', '?')}; "
          f"pin={args.pin} (handler CPU {h.hcpu}, faulting threads CPU {h.fcpu}); "
          f"{args.pages} pages of 4 KiB per run; {load}.",
          "",
          f"Medians of {args.rounds} interleaved rounds; `x` = ratio to the C handler "
          "(p50: lower is better; MiB/s: higher is better).",
          "",
          report.md_table(head, rows), "", "Targets:", "", report.targets_text(tgt, md=True)]
    md_text = "\n".join(md) + "\n"
    (rundir / "summary.md").write_text(md_text)
    doc = {"meta": meta, "runs": runs,
           "summary": [{"mode": k[0], "order": k[1], "threads": k[2], "readahead": k[3],
                        "contender": c, **v} for k, by in summary.items() for c, v in by.items()],
           "paired_p50_ratio": paired, "paired_mib_ratio": paired_thr, "targets": tgt,
           "plots": plots}
    (rundir / "results.json").write_text(json.dumps(doc, indent=1))
    latest = outdir / "latest.json"
    with contextlib.suppress(OSError):
        latest.unlink()
    latest.write_text(json.dumps(doc, indent=1))
    print(f"results: {rundir / 'results.json'} (and {latest}), summary: "
          f"{rundir / 'summary.md'}")
    if args.update_readme:
        _update_readme(pathlib.Path(args.update_readme), md_text)
    return 1 if failures else 0


def _update_readme(path: pathlib.Path, md_text: str) -> None:
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        print(f"{path}: no {README_BEGIN} ... {README_END} markers; not updated",
              file=sys.stderr)
        return
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(f"{head}{README_BEGIN}\n{md_text}{README_END}{tail}")
    print(f"updated {path}")
