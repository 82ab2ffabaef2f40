"""``uffd-aio serve --state-dir``: a server that dies or is upgraded hangs no client.

Real kernel, real processes: the servers are ``uffd-aio serve`` child processes and the
clients the benchmarks' C ``workload`` (a Firecracker-style VMM stand-in that keeps its
own uffd copy, touches every page from 4 threads and verifies every word).  Every child,
and the fd keeper the server starts (its own session: it outlives servers on purpose), is
killed when its test ends.  Timings are printed, never asserted
(``benchmarks/crash_recovery.py`` measures the stalls).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_handoff_server import (
    CHILD_ALARM,
    CHILD_WAIT,
    ROOT,
    Children,
    _build,
    children,
    parse,
    workload_args,
)
from tests.limits import limit
from uffd_aio import testing
from uffd_aio.serve_state import encode, process_start_time
from uffd_aio.server import HandoffServer
from uffd_aio.stores.file import FileBackend

pytestmark = pytest.mark.timeout(150)

PS = 4096
PAGES = 8192  # per client: 32 MiB in 2 regions, 4 threads, random order
PYTHON = str(ROOT / ".venv" / "bin" / "python")


@pytest.fixture(scope="module")
def workload() -> Path:
    return _build(ROOT / "benchmarks" / "c", "build/workload")


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("snap") / "mem.snap"
    path.write_bytes(testing.pattern_bytes(0, PAGES * PS))
    return path


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "state"
    yield d
    with contextlib.suppress(OSError, ValueError):  # the keeper dies with the test
        os.kill(int((d / "fdkeeper.pid").read_text()), signal.SIGKILL)


def _clients_in(state: Path) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(state / "clients") if n.endswith(".json"))
    return []


async def _until(cond: Any, what: str, timeout: float = 30) -> None:
    async with asyncio.timeout(limit(timeout)):
        while not cond():  # noqa: ASYNC110 (a file count in another process's directory)
            await asyncio.sleep(0.02)


async def start_server(kids: Children, sock: str, snap: Path, state: Path, *extra: Any
                       ) -> tuple[asyncio.subprocess.Process, list[str]]:
    """``uffd-aio serve --state-dir`` as a child; returns it once it listens, and the
    list its log lines are collected into."""
    p = await kids.start(PYTHON, "-m", "uffd_aio", "-v", "serve", "--socket", sock,
                         "--backend", f"file:{snap}", "--state-dir", state,
                         "--keeper-idle", 2, "--loop", "asyncio", *extra)
    lines: list[str] = []
    assert p.stderr is not None
    async with asyncio.timeout(limit(60)):
        while True:
            raw = await p.stderr.readline()
            if not raw:
                pytest.fail("uffd-aio serve exited at start-up:\n" + "\n".join(lines))
            lines.append(raw.decode(errors="replace").rstrip())
            if "listening on" in lines[-1]:
                break

    async def drain() -> None:
        assert p.stderr is not None
        while raw := await p.stderr.readline():
            lines.append(raw.decode(errors="replace").rstrip())

    kids.drains.append(asyncio.ensure_future(drain()))
    return p, lines


@contextlib.asynccontextmanager
async def kids_() -> AsyncIterator[Children]:
    async with children() as kids:
        kids.drains = []  # type: ignore[attr-defined]
        try:
            yield kids
        finally:
            await kids.kill_all()
            for d in kids.drains:  # type: ignore[attr-defined]
                d.cancel()


async def _finish_all(kids: Children, procs: list[asyncio.subprocess.Process]
                      ) -> list[dict[str, Any]]:
    out = []
    for p in procs:
        rc, stdout, err = await kids.finish(p)
        assert rc == 0, (rc, stdout, err)
        doc = parse(stdout)
        assert doc["verified"] is True and doc["faults_timed"] == PAGES, doc
        out.append(doc)
    return out


async def _exit(p: asyncio.subprocess.Process) -> int:
    """The exit status of a server child (its stderr is drained by start_server)."""
    async with asyncio.timeout(limit(20)):
        return await p.wait()


def _no_gc_trouble(log: list[str]) -> None:
    """CPython 3.11 says this just before it crashes in a memoryview's deallocation
    (gh-77894: a view the GC cleared while a buffer pin still exported it)."""
    assert not any("Exception ignored in tp_clear" in line for line in log), "\n".join(log)


def _stall(docs: list[dict[str, Any]]) -> str:
    return f"longest fault {max(d['max_us'] for d in docs) / 1e3:.1f} ms"


def _args(workload: Path, sock: str, seed: int, *extra: Any) -> list[Any]:
    return workload_args(workload, sock, PAGES, 4, 2, "--order", "random", "--seed", seed,
                         *extra)


# --churn-ms: after touching every page the client keeps dropping (MADV_DONTNEED) and
# re-reading pages for 8 s, checked: with native serving the touch alone is over in
# milliseconds, before a restart could happen "under load"
CHURN = ("--churn-ms", 8000)


async def test_sigkill_and_restart_serves_every_client_again(
        workload: Path, snapshot: Path, state_dir: Path, tmp_path: Path) -> None:
    sock = str(tmp_path / "uffd.sock")
    async with kids_() as kids:
        server, _ = await start_server(kids, sock, snapshot, state_dir)
        clients = [await kids.start(*_args(workload, sock, i + 1, *CHURN)) for i in range(4)]
        victim = await kids.start(*workload_args(workload, sock, PAGES, 2, 1, "--seed", 9))
        await _until(lambda: len(_clients_in(state_dir)) == 5, "5 clients adopted")
        assert all(c.returncode is None for c in clients)  # faulting now
        server.send_signal(signal.SIGKILL)
        await server.wait()
        victim.kill()  # a client that dies while no server runs
        await victim.wait()
        # faults stall, but no client fails: it waits for the next server
        assert all(c.returncode is None for c in clients)
        server2, log = await start_server(kids, sock, snapshot, state_dir)
        docs = await _finish_all(kids, clients)
        print(f"SIGKILL + restart, 4 clients: {_stall(docs)}")
        text = "\n".join(log)
        assert "4 clients served again, 1 gone" in text, text
        assert "uffd_aio.client_readopted" in text
        # every state file is gone once the clients are (the victim's at the restart)
        await _until(lambda: _clients_in(state_dir) == [], "state cleaned up")
        server2.send_signal(signal.SIGTERM)
        assert await _exit(server2) == 0


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
async def test_takeover_under_load(workload: Path, snapshot: Path, state_dir: Path,
                                   tmp_path: Path, native: bool) -> None:
    """Native serving (the default) with churning clients (REMOVE events, EAGAIN retries in
    flight at the handover: they are abandoned to the successor, never poisoned), and the
    Python path."""
    sock = str(tmp_path / "uffd.sock")
    path_args = () if native else ("--no-native",)
    client_args = CHURN if native else ()
    async with kids_() as kids:
        old, old_log = await start_server(kids, sock, snapshot, state_dir, *path_args)
        clients = [await kids.start(*_args(workload, sock, i + 1, *client_args))
                   for i in range(4)]
        await _until(lambda: len(_clients_in(state_dir)) == 4, "4 clients adopted")
        new, log = await start_server(kids, sock, snapshot, state_dir, "--takeover",
                                      *path_args)
        # the old one exits by itself, cleanly (test_buffer_pins.py: its final garbage
        # collection used to crash it, ~1 run in 4)
        assert await _exit(old) == 0, "\n".join(old_log)
        assert "4 clients served again" in "\n".join(log)
        assert any("uffd_aio.handed_over" in line for line in old_log)
        docs = await _finish_all(kids, clients)
        print(f"takeover under load, 4 clients ({'native' if native else 'python'}): "
              f"{_stall(docs)}")
        # the new server accepts on the socket it received
        late = await kids.start(*workload_args(workload, sock, 512, 2, 1))
        rc, out, err = await kids.finish(late)
        assert rc == 0 and parse(out)["verified"] is True, (out, err)
        new.send_signal(signal.SIGTERM)
        assert await _exit(new) == 0
    _no_gc_trouble(old_log + log)


def test_repeated_takeovers_under_load_every_old_server_exits_cleanly(
        workload: Path, snapshot: Path, state_dir: Path, tmp_path: Path) -> None:
    """A chain of native takeovers while 4 clients churn (faults in flight at every
    handover): each old server exits with 0 and no tp_clear warning (its final garbage
    collection crashed about 1 run in 4 before buffer pins stopped exporting
    memoryviews; test_buffer_pins.py holds the deterministic checks).  Synchronous: the
    servers' loop is their own, once is enough."""
    asyncio.run(_takeover_chain(workload, snapshot, state_dir, str(tmp_path / "uffd.sock")))


TAKEOVERS = 3
CHAIN_CHURN_MS = 20000  # every client still churns at the last takeover, under ASan too


async def _takeover_chain(workload: Path, snapshot: Path, state_dir: Path, sock: str) -> None:
    async with kids_() as kids:
        server, log = await start_server(kids, sock, snapshot, state_dir)
        clients = [await kids.start(*_args(workload, sock, i + 1, "--churn-ms",
                                           CHAIN_CHURN_MS)) for i in range(4)]
        await _until(lambda: len(_clients_in(state_dir)) == 4, "4 clients adopted")
        for n in range(TAKEOVERS):
            new, new_log = await start_server(kids, sock, snapshot, state_dir, "--takeover")
            rc = await _exit(server)
            assert rc == 0, f"takeover {n + 1}: old server exited with {rc}\n" + "\n".join(log)
            _no_gc_trouble(log)
            assert "4 clients served again" in "\n".join(new_log), "\n".join(new_log)
            assert all(c.returncode is None for c in clients)  # still under load
            server, log = new, new_log
        await _finish_all(kids, clients)
        server.send_signal(signal.SIGTERM)
        assert await _exit(server) == 0, "\n".join(log)
        _no_gc_trouble(log)


async def test_takeover_without_a_running_server_is_a_clear_error(
        snapshot: Path, state_dir: Path, tmp_path: Path) -> None:
    async with kids_() as kids:
        p = await kids.start(PYTHON, "-m", "uffd_aio", "serve", "--socket",
                             tmp_path / "s.sock", "--backend", f"file:{snapshot}",
                             "--state-dir", state_dir, "--takeover")
        rc, _, err = await kids.finish(p, timeout=limit(30))
    assert rc == 2 and "no server to take over" in err, err


async def test_second_server_on_a_state_dir_is_refused(snapshot: Path, state_dir: Path,
                                                       tmp_path: Path) -> None:
    async with kids_() as kids:
        first, _ = await start_server(kids, str(tmp_path / "a.sock"), snapshot, state_dir)
        p = await kids.start(PYTHON, "-m", "uffd_aio", "serve", "--socket",
                             tmp_path / "b.sock", "--backend", f"file:{snapshot}",
                             "--state-dir", state_dir)
        rc, _, err = await kids.finish(p, timeout=limit(30))
        assert rc == 2 and "another server uses the state directory" in err, err
        assert first.returncode is None


async def test_corrupt_and_foreign_state_is_rejected_and_never_crashes(
        workload: Path, snapshot: Path, state_dir: Path, tmp_path: Path) -> None:
    from tests.unit.test_serve_state import _state

    cdir = state_dir / "clients"
    cdir.mkdir(parents=True)
    (cdir / "1-2.json").write_bytes(b'{"magic": "uffd-aio/serve-state", "vers')  # torn
    (cdir / "3-4.json").write_bytes(b"\x00\xff garbage")
    foreign = _state(pid=os.getpid(), start_time=process_start_time(os.getpid()),
                     fds=("x",), backend="zero")
    (cdir / f"{foreign.key}.json").write_bytes(encode(foreign))
    sock = str(tmp_path / "uffd.sock")
    backend = await FileBackend.open(snapshot)
    try:
        async with HandoffServer(sock, backend, state_dir=state_dir, keeper_idle=1,
                                 handoff_timeout=2.0) as server, children() as kids:
            assert server.recovery is not None
            assert (server.recovery.rejected, server.recovery.adopted) == (3, 0)
            assert _clients_in(state_dir) == []
            assert len(os.listdir(state_dir / "rejected")) == 3  # kept aside, not deleted
            p = await kids.start(*workload_args(workload, sock, 1024, 2, 1))
            rc, out, err = await kids.finish(p)
            assert rc == 0 and parse(out)["verified"] is True, (out, err)
    finally:
        await backend.aclose()


async def test_on_fatal_kill_clients(workload: Path, snapshot: Path, tmp_path: Path) -> None:
    sock = str(tmp_path / "uffd.sock")
    backend = await FileBackend.open(snapshot)
    try:
        async with HandoffServer(sock, backend, on_fatal="kill-clients",
                                 handoff_timeout=2.0) as server, children() as kids:
            # a client that would hang: its server is about to fail
            p = await kids.start(*workload_args(workload, sock, PAGES, 2, 1))
            await server.wait_clients(1, timeout=limit(30))
            server.fatal(RuntimeError("injected"))
            with pytest.raises(RuntimeError, match="injected"):
                await server.serve_forever()
            rc, _, _ = await kids.finish(p)
            assert rc == -signal.SIGKILL
    finally:
        await backend.aclose()


def test_kill_checks_the_process_instance() -> None:
    from uffd_aio.server import _kill

    p = subprocess.Popen(["sleep", "30"])
    try:
        start = process_start_time(p.pid)
        assert start is not None
        log = _Log()
        assert not _kill(p.pid, start + 1, -1, log, "test")  # a recycled pid: spared
        assert p.poll() is None and "uffd_aio.client_not_killed" in log.events
        assert _kill(p.pid, start, -1, log, "test")
        assert p.wait(timeout=limit(10)) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()


class _Log:
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return lambda event, **kw: self.events.append(event)


def test_state_files_are_json_with_the_client_identity(tmp_path: Path) -> None:
    # (documented format: the file a restarted server reads; see docs/handoff.md)
    from tests.unit.test_serve_state import _state

    doc = json.loads(encode(_state()))
    assert {"pid", "start_time", "mappings", "backend", "checksum"} <= set(doc)
    assert CHILD_ALARM < CHILD_WAIT
