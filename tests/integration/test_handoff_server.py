"""HandoffServer end to end: C clients in child processes hand over their uffds.

Clients are native programs (the benchmarks' ``workload`` and the snapshot
example's ``vmm``): memory registered with a uffd is never touched from this
Python process.  Every child is killed when its test ends, passed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests import limits
from tests.limits import limit
from uffd_aio import testing
from uffd_aio.modes import Feature
from uffd_aio.serve_cli import start_metrics
from uffd_aio.server import HandoffServer
from uffd_aio.stores.base import Buffer
from uffd_aio.stores.file import FileBackend
from uffd_aio.stores.zero import ZeroBackend
from uffd_aio.uffd import Userfaultfd, available_features

# The limits nest so that a hang reports the child's own output (issue 10): a C client's
# alarm (--timeout, its whole run) fires first and it exits with status 2 saying which stage
# hung; Children.finish waits longer than that, and on its own timeout kills the child and
# fails with whatever it printed; pytest's timeout is last, above a few clients in sequence.
# All three are host seconds stretched by the machine's measured speed factor (the VM lane,
# tests/limits.py): conftest.py scales TEST_TIMEOUT the same way.
CHILD_ALARM = round(limit(25))  # s: the workload's --timeout (a run takes ~1-3 s on the host)
CHILD_WAIT = CHILD_ALARM + limit(5)  # s: Children.finish's default
TEST_TIMEOUT = 120  # host s: three clients in sequence (3 x 30 s) and set-up
assert CHILD_ALARM < CHILD_WAIT < limits.timeout(TEST_TIMEOUT)
pytestmark = pytest.mark.timeout(TEST_TIMEOUT)

ROOT = Path(__file__).resolve().parents[2]
PS = 4096
SNAP_PAGES = 8192  # 32 MiB


def _build(directory: Path, target: str) -> Path:
    if shutil.which("make") is None or shutil.which("cc") is None:
        pytest.skip("needs make and a C compiler")
    subprocess.run(["make", "-s", "-C", str(directory), target], check=True, timeout=120,
                   capture_output=True)
    return directory / target


@pytest.fixture(scope="session")
def workload() -> Path:
    return _build(ROOT / "benchmarks" / "c", "build/workload")


@pytest.fixture(scope="session")
def vmm() -> Path:
    return _build(ROOT / "examples" / "snapshot_restore", "vmm")


@pytest.fixture(scope="session")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("snap") / "mem.snap"
    path.write_bytes(testing.pattern_bytes(0, SNAP_PAGES * PS))
    return path


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "uffd.sock")


class Children:
    """Child processes of one test; all killed at the end."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, *argv: Any) -> asyncio.subprocess.Process:
        p = await asyncio.create_subprocess_exec(
            *map(str, argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self.procs.append(p)
        return p

    async def finish(self, p: asyncio.subprocess.Process, timeout: float = CHILD_WAIT
                     ) -> tuple[int, str, str]:
        """Wait for ``p``; after ``timeout`` s kill it and fail with what it printed."""
        comm = asyncio.ensure_future(p.communicate())
        try:
            async with asyncio.timeout(timeout):
                out, err = await asyncio.shield(comm)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            async with asyncio.timeout(limit(10)):  # the pipes close when it dies
                out, err = await comm
            pytest.fail(f"child {p.pid} did not finish within {timeout} s (killed)\n"
                        f"--- stdout ---\n{out.decode(errors='replace')}\n"
                        f"--- stderr ---\n{err.decode(errors='replace')}")
        assert p.returncode is not None
        return p.returncode, out.decode(), err.decode()

    async def kill_all(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(p.wait(), limit(5))


@contextlib.asynccontextmanager
async def children() -> AsyncIterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        await c.kill_all()


@contextlib.asynccontextmanager
async def serving(sock_path: str, backend: Any, **kw: Any) -> AsyncIterator[HandoffServer]:
    kw.setdefault("handoff_timeout", 2.0)
    async with HandoffServer(sock_path, backend, **kw) as server:
        yield server


def workload_args(workload: Path, sock_path: str, pages: int, threads: int = 4,
                  regions: int = 2, *extra: Any) -> list[Any]:
    # --timeout is the workload's alarm for its whole run (a hung fault fails it, with its
    # output); see CHILD_ALARM
    return [workload, "--socket", sock_path, "--pages", pages, "--threads", threads,
            "--regions", regions, "--timeout", CHILD_ALARM, "--connect-timeout", 5, *extra]


def parse(out: str) -> dict[str, Any]:
    line = out.strip().splitlines()[-1]
    doc: dict[str, Any] = json.loads(line)
    return doc


def _exists(path: str) -> bool:
    return os.path.exists(path)


def uffds_open() -> int:
    n = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[userfaultfd]"
    return n


# ---- the happy path ---------------------------------------------------------------------


async def test_four_clients_four_threads_file_backend(workload: Path, snapshot: Path,
                                                      sock_path: str) -> None:
    backend = await FileBackend.open(snapshot)
    try:
        async with serving(sock_path, backend, allow_uids={os.getuid()}) as server, \
                children() as kids:
            procs = [await kids.start(*workload_args(workload, sock_path, 2048,
                                                     4, 2, "--label", f"c{i}"))
                     for i in range(4)]
            results = await asyncio.gather(*(kids.finish(p) for p in procs))
            for rc, out, err in results:
                assert rc == 0, (out, err)
                doc = parse(out)
                assert doc["verified"] is True and doc["bad_words"] == 0
                assert doc["threads"] == 4 and doc["pages"] == 2048
            await server.wait_clients(0)
            st = server.stats
            assert (st.served, st.closed, st.invalid, st.rejected) == (4, 4, 0, 0)
            assert st.faults >= 4 * 2048 and st.resolved_bytes == 4 * 2048 * PS
            assert st.errors == 0
            # native serving is the default for a file: backend
            assert st.native_faults >= 4 * 2048 and st.native_regions == 8
            assert st.python_regions == 0
    finally:
        await backend.aclose()
    assert backend.reads == 0  # the engine read the file, not the backend


async def test_readahead_and_balloon_refetch(vmm: Path, snapshot: Path, sock_path: str
                                             ) -> None:
    backend = await FileBackend.open(snapshot)
    try:
        async with serving(sock_path, backend, attach_options={"readahead": "adaptive"}
                           ) as server, children() as kids:
            # 36 MiB of guest memory from a 32 MiB snapshot: the last 4 MiB read as zeros
            p = await kids.start(vmm, "restore", "--socket", sock_path, "--snapshot", snapshot,
                                 "--mib", 36, "--threads", 4, "--balloon", "refetch",
                                 "--timeout", 25)
            rc, out, err = await kids.finish(p)
            assert rc == 0, (out, err)
            assert "content check against the snapshot: ok" in out
            assert "read as the snapshot: ok" in out
            await server.wait_clients(0)
            assert server.stats.faults < 36 * 256 // 2  # read-ahead: far fewer faults than pages
    finally:
        await backend.aclose()


async def test_balloon_zero_policy(vmm: Path, snapshot: Path, sock_path: str) -> None:
    backend = await FileBackend.open(snapshot)
    try:
        with capture_logs() as logs:
            async with serving(sock_path, backend, remove="zero") as server, \
                    children() as kids:
                p = await kids.start(vmm, "restore", "--socket", sock_path, "--snapshot",
                                     snapshot, "--mib", 8, "--threads", 2, "--balloon", "zero",
                                     "--timeout", 25)
                rc, out, err = await kids.finish(p)
                assert rc == 0, (out, err)
                assert "read as zeros: ok" in out
                await server.wait_clients(0)
        released = [e for e in logs if e["event"] == "uffd_aio.client_released"]
        assert released and released[0]["removes"] >= 1
        # zeros after REMOVE on a file: Python keeps the removed ranges
        assert released[0]["path"] == "python"
        assert any(e["event"] == "uffd_aio.client_python_path" and "--remove zero" in
                   e["reason"] for e in logs)
    finally:
        await backend.aclose()


async def test_record_then_replay(vmm: Path, snapshot: Path, sock_path: str,
                                  tmp_path: Path) -> None:
    from uffd_aio.serving.readahead import read_trace

    trace = tmp_path / "faults.trace"
    backend = await FileBackend.open(snapshot)
    args = ["restore", "--socket", sock_path, "--snapshot", snapshot, "--mib", 8,
            "--threads", 2, "--timeout", 25]
    try:
        async with serving(sock_path, backend, record=trace) as server, children() as kids:
            rc, out, err = await kids.finish(await kids.start(vmm, *args))
            assert rc == 0, (out, err)
            await server.wait_clients(0)
            # first touches come from the engine's log: the faults stay native
            assert server.stats.native_regions >= 1 and server.stats.python_regions == 0
            assert server.stats.native_faults > 0
        ps, order = read_trace(trace)
        assert ps == PS and sorted(order) == list(range(8 * 256))  # every page, once
        with capture_logs() as logs:
            async with serving(sock_path, backend, replay=trace) as server, \
                    children() as kids:
                rc, out, err = await kids.finish(await kids.start(vmm, *args))
                assert rc == 0, (out, err)
                await server.wait_clients(0)
                # replay prefetches in Python while the engine serves the faults
                assert server.stats.native_regions >= 1 and server.stats.python_regions == 0
        assert any(e["event"] == "uffd_aio.replay_started" for e in logs)
        done = [e for e in logs if e["event"] == "uffd_aio.replay_finished"]
        released = [e for e in logs if e["event"] == "uffd_aio.client_released"]
        # pages came in ahead of the faults (the replay may still be running at release),
        # or the engine served the faults in C before the first prefetch landed (a vmm
        # touches its 8 MiB in milliseconds): prefetches then skip present pages (EEXIST)
        assert (sum(e["pages"] for e in done) > 0 or released[0]["faults"] < 8 * 256
                or released[0]["native_faults"] > 0)
        assert released[0]["errors"] == 0
        assert not [e for e in logs if e["event"] == "uffd_aio.prefetch_failed"]
    finally:
        await backend.aclose()


# ---- bad input --------------------------------------------------------------------------

BASE = 0x7F00_0000_0000


def mapping(base: int = BASE, size: int = 16 * PS, offset: int = 0, **kw: Any) -> dict[str, Any]:
    m = {"base_host_virt_addr": base, "size": size, "offset": offset, "page_size": PS,
         "page_size_kib": PS, **kw}
    return {k: v for k, v in m.items() if v is not None}


def _bad_payloads() -> dict[str, tuple[bytes, int, str]]:
    """name -> (payload, fds to send: 0 none, 1 a uffd, 2 a uffd + a pipe, -1 a pipe,
    expected log text)."""
    j = lambda *m: json.dumps(list(m)).encode()  # noqa: E731
    return {
        "no_fd": (j(mapping()), 0, "sent no file descriptor"),
        "several_fds": (j(mapping()), 2, "sent 2 file descriptors"),
        "not_a_uffd": (j(mapping()), -1, "not a userfaultfd"),
        "invalid_json": (b'[{"base_host_virt_addr": 1,}]', 1, "invalid JSON"),
        "truncated": (b'[{"base_host_virt_addr": 1,', 1, "did not complete the handoff"),
        "not_utf8": (b"\xff\xfe\xfd]", 1, "not UTF-8"),
        "overlapping": (j(mapping(), mapping(BASE + 8 * PS)), 1, "overlaps"),
        "unaligned": (j(mapping(BASE + 100)), 1, "multiples of the page size"),
        "absurd_size": (j(mapping(size=1 << 50)), 1, "exceeds the limit"),
        # (small enough for the socket buffer: the test sends from the loop thread)
        "absurd_count": (j(*(mapping(BASE + 2 * i * PS, PS) for i in range(300))), 1,
                         "300 mappings exceed the limit of 256"),
        "zero_size": (j(mapping(size=0)), 1, "size is 0"),
        "missing_field": (json.dumps([{"size": PS}]).encode(), 1, "missing field"),
        "kib_in_kib": (j(mapping(page_size=None, page_size_kib=4)), 1, "holds bytes"),
        # Python's int-size limit (4300 digits) raised a ValueError out of the parser
        "huge_integer": (b'[{"base_host_virt_addr": ' + b"9" * 5000 + b', "size": 4096, '
                         b'"offset": 0, "page_size": 4096}]', 1, "integer of 5000 digits"),
        "silent": (b"", 0, "did not complete the handoff within"),
        "eof": (b"", 0, "closed the connection without sending"),
    }


@contextlib.contextmanager
def bad_client(sock_path: str, name: str) -> Iterator[socket.socket]:
    payload, nfds, _ = _bad_payloads()[name]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    to_close: list[int] = []
    uffd = None
    try:
        s.connect(sock_path)
        fds: list[int] = []
        if nfds in (1, 2):
            uffd = Userfaultfd.open()
            fds.append(uffd.fd)
        if nfds in (2, -1):
            r, w = os.pipe()
            to_close += [r, w]
            fds.append(r)
        if fds:
            socket.send_fds(s, [payload], fds)
        elif payload:
            s.sendall(payload)
        elif name == "eof":
            s.shutdown(socket.SHUT_WR)
        yield s
    finally:
        s.close()
        for fd in to_close:
            os.close(fd)
        if uffd is not None:
            uffd.close()


async def closed_by_server(s: socket.socket, timeout: float = 5) -> bool:
    s.setblocking(False)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(limit(timeout)):
        while True:
            try:
                data = await loop.sock_recv(s, 100)
            except ConnectionResetError:
                return True
            if not data:
                return True


async def test_bad_input_is_logged_and_closed_while_others_are_served(
        workload: Path, snapshot: Path, sock_path: str) -> None:
    backend = await FileBackend.open(snapshot)
    names = list(_bad_payloads())
    try:
        with capture_logs() as logs:
            async with serving(sock_path, backend, handoff_timeout=0.5) as server, \
                    children() as kids:
                # a good client that keeps faulting (and madvising: REMOVE events) all along
                good = await kids.start(*workload_args(workload, sock_path, 4096, 4, 2,
                                                       "--churn-ms", 1500))
                await server.wait_clients(1)
                for name in names:
                    with bad_client(sock_path, name) as s:
                        assert await closed_by_server(s), name
                assert server.stats.served == 1
                rc, out, err = await kids.finish(good)
                assert rc == 0, (out, err)
                doc = parse(out)
                assert doc["verified"] is True and doc["churn"]["bad_reads"] == 0
                assert doc["churn"]["madvises"] > 0
                await server.wait_clients(0)
                assert server.stats.invalid == len(names)
        # (the churning client may also cause handler errors: an madvise storm can starve a
        # copy of EAGAIN-free moments; those faults are retried, its data stays right)
        errors = [e for e in logs if e["log_level"] == "error"
                  and e["event"].startswith("uffd_aio.handoff")]
        assert len(errors) == len(names), errors
        for name, e in zip(names, errors, strict=True):
            assert e["event"] == "uffd_aio.handoff_invalid"
            assert _bad_payloads()[name][2] in e["error"], (name, e["error"])
            assert e["peer_pid"] == os.getpid()
    finally:
        await backend.aclose()


async def test_allow_uid_rejects_other_peers(sock_path: str) -> None:
    with capture_logs() as logs:
        async with serving(sock_path, ZeroBackend(), allow_uids={os.getuid() + 1}) as server:
            uffd = Userfaultfd.open()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(sock_path)
                socket.send_fds(s, [json.dumps([mapping()]).encode()], [uffd.fd])
                assert await closed_by_server(s)
            finally:
                s.close()
                uffd.close()
            assert server.stats.rejected == 1 and server.stats.served == 0
    rejected = [e for e in logs if e["event"] == "uffd_aio.handoff_rejected"]
    assert len(rejected) == 1 and "is not allowed" in rejected[0]["error"]


async def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Poll ``condition`` (server counters have no event to wait on)."""
    async with asyncio.timeout(limit(timeout)):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def _handoff(sock_path: str) -> tuple[socket.socket, Userfaultfd]:
    """A minimal good handoff from this process (a uffd with nothing registered: nothing
    can fault)."""
    uffd = Userfaultfd.open()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
        socket.send_fds(s, [json.dumps([mapping()]).encode()], [uffd.fd])
    except BaseException:
        s.close()
        uffd.close()
        raise
    return s, uffd


async def test_unexpected_failure_in_a_client_task_is_logged_and_counted(
        sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import uffd_aio.server as server_module

    async def broken_receive(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("a bug in receive")

    monkeypatch.setattr(server_module, "receive", broken_receive)
    unhandled: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: unhandled.append(ctx))
    with capture_logs() as logs:
        async with serving(sock_path, ZeroBackend()) as server:
            s, uffd = _handoff(sock_path)
            try:
                assert await closed_by_server(s)
            finally:
                s.close()
                uffd.close()
            await until(lambda: server.stats.invalid + server.stats.failed > 0)
            assert server.stats.invalid == 1 and server.stats.served == 0
            # the server still works
            monkeypatch.undo()
            s, uffd = _handoff(sock_path)
            try:
                await server.wait_clients(1)
            finally:
                s.close()
                uffd.close()
            await server.wait_clients(0)
    assert not unhandled
    errors = [e for e in logs if e["event"] == "uffd_aio.handoff_invalid"]
    assert len(errors) == 1 and "RuntimeError: a bug in receive" in errors[0]["error"]


async def test_too_many_clients_names_the_peer(sock_path: str) -> None:
    with capture_logs() as logs:
        async with serving(sock_path, ZeroBackend(), max_clients=1) as server:
            first = _handoff(sock_path)
            try:
                await server.wait_clients(1)
                second = _handoff(sock_path)
                try:
                    assert await closed_by_server(second[0])
                finally:
                    second[0].close()
                    second[1].close()
                assert len(server.clients) == 1 and server.stats.rejected == 1
            finally:
                first[0].close()
                first[1].close()
            await server.wait_clients(0)
    [e] = [e for e in logs if e["event"] == "uffd_aio.too_many_clients"]
    assert e["peer_pid"] == os.getpid() and f"peer pid {os.getpid()}" in e["error"]


async def test_idle_connections_do_not_lock_out_a_real_client(
        workload: Path, snapshot: Path, sock_path: str) -> None:
    """Issue 11 bug 6: connections that never hand off held client slots; more of them
    than max_clients turned the next real client away (which then hung on its uffd)."""
    backend = await FileBackend.open(snapshot)
    idle: list[socket.socket] = []
    try:
        async with serving(sock_path, backend, max_clients=2, max_pending=4,
                           handoff_timeout=600) as server, children() as kids:
            for _ in range(10):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                idle.append(s)
                s.connect(sock_path)
            await until(lambda: server.stats.connections == 10)
            assert server.pending == 4 and server.stats.rejected == 6
            p = await kids.start(*workload_args(workload, sock_path, 512, 2, 1))
            rc, out, err = await kids.finish(p)
            assert rc == 0 and parse(out)["verified"] is True, (out, err)
            assert server.stats.served == 1
            # the oldest idle connections were dropped, newer ones still wait
            for s in idle[:6]:
                assert await closed_by_server(s)
    finally:
        for s in idle:
            s.close()
        await backend.aclose()


_FLOODER = """
import json, socket, sys
from uffd_aio.uffd import Userfaultfd
uffd = Userfaultfd.open()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
m = [{"base_host_virt_addr": 0x7f0000000000, "size": 65536, "offset": 0, "page_size": 4096}]
socket.send_fds(s, [json.dumps(m).encode()], [uffd.fd])
print("sent", flush=True)
sys.stdin.readline()  # the test says when (after the server adopted us)
chunk = b"x" * 65536
while True:
    s.sendall(chunk)
"""


async def test_a_flooding_client_does_not_starve_the_others(
        workload: Path, snapshot: Path, sock_path: str) -> None:
    """Issue 11 bug 4: a client that kept sending after its handoff made the server read
    and discard its bytes in a tight loop, slowing every other client 15x."""
    backend = await FileBackend.open(snapshot)
    try:
        with capture_logs() as logs:
            async with serving(sock_path, backend) as server, children() as kids:
                flooder = await asyncio.create_subprocess_exec(
                    str(ROOT / ".venv" / "bin" / "python"), "-c", _FLOODER, sock_path,
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
                kids.procs.append(flooder)
                assert flooder.stdout is not None and flooder.stdin is not None
                async with asyncio.timeout(limit(30)):
                    while (line := await flooder.stdout.readline()) != b"sent\n":
                        assert line, "the flooder exited before sending"
                await server.wait_clients(1)
                flooder.stdin.write(b"go\n")
                await flooder.stdin.drain()
                await until(lambda: server.stats.extra_bytes > 0)
                p = await kids.start(*workload_args(workload, sock_path, 2048, 2, 1))
                rc, out, err = await kids.finish(p)
                assert rc == 0 and parse(out)["verified"] is True, (out, err)
                # the flooder is still served and still alive (blocked on its full socket
                # buffer), and the server read one chunk of its bytes, not gigabytes
                await server.wait_clients(1)
                assert flooder.returncode is None
                assert server.stats.extra_bytes <= 4096, server.stats.extra_bytes
                flooder.kill()
                await flooder.wait()
                await server.wait_clients(0)  # released (pidfd) although never read again
        extra = [e for e in logs if e["event"] == "uffd_aio.client_extra_data"]
        assert len(extra) == 1 and extra[0]["log_level"] == "warning"
    finally:
        await backend.aclose()


# ---- clients that go away ---------------------------------------------------------------


class SlowBackend:
    """The pattern, slowly: a client is surely mid-run when it is killed."""

    name = "slow-pattern"

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def fetch(self, offset: int, length: int) -> Buffer | None:
        await asyncio.sleep(self.delay)
        return testing.pattern_bytes(offset, length)

    async def store(self, offset: int, data: Buffer) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


async def test_client_killed_mid_run_frees_its_state(workload: Path, sock_path: str) -> None:
    before = uffds_open()
    with capture_logs() as logs:
        async with serving(sock_path, SlowBackend(0.002)) as server, children() as kids:
            victim = await kids.start(*workload_args(workload, sock_path, 50000, 4, 2))
            await server.wait_clients(1)
            await asyncio.sleep(0.3)
            assert server.clients[0].faults > 0
            # the victim's uffd, held by its pager (+ its writer fd on a patched kernel)
            per_client = 2 if available_features() & Feature.WRITE else 1
            assert uffds_open() == before + per_client
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            await server.wait_clients(0)
            assert uffds_open() == before
            assert server.stats.closed == 1
            # the server is still fine: the next client is served
            p = await kids.start(*workload_args(workload, sock_path, 512, 2, 1))
            rc, out, err = await kids.finish(p)
            assert rc == 0 and parse(out)["verified"] is True, (out, err)
    released = [e for e in logs if e["event"] == "uffd_aio.client_released"]
    assert released[0]["reason"] in ("process exited", "connection closed")
    assert released[0]["faults"] > 0
    # a client that went away is no server error (issue 11 bug 7): no error-level lines
    assert not [e for e in logs if e["log_level"] == "error"
                and "RangeGone" in str(e.get("error"))]


class FailingBackend:
    """The pattern, except that store offsets from ``bad`` on fail."""

    name = "failing-pattern"

    def __init__(self, bad: int) -> None:
        self.bad = bad

    async def fetch(self, offset: int, length: int) -> Buffer | None:
        await asyncio.sleep(0)
        if offset + length > self.bad:
            from uffd_aio.stores.base import BackendError

            raise BackendError(f"simulated I/O error at {offset:#x}")
        return testing.pattern_bytes(offset, length)

    async def store(self, offset: int, data: Buffer) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


async def test_backend_error_poisons_only_that_client(workload: Path, sock_path: str) -> None:
    async with serving(sock_path, FailingBackend(600 * PS)) as server, children() as kids:
        # this one touches store pages past 600: SIGBUS (on_error="poison"), not a hang
        doomed = await kids.start(*workload_args(workload, sock_path, 1024, 2, 1))
        fine = await kids.start(*workload_args(workload, sock_path, 512, 2, 1))
        rc, out, err = await kids.finish(fine)
        assert rc == 0 and parse(out)["verified"] is True, (out, err)
        rc, out, err = await kids.finish(doomed)
        assert rc == -signal.SIGBUS, (rc, out, err)
        await server.wait_clients(0)
        assert server.stats.errors >= 1 and server.stats.closed == 2


async def test_keep_after_eof_serves_until_the_process_exits(workload: Path,
                                                             sock_path: str) -> None:
    # --close-uffd-style VMMs that drop the socket after the handoff: simulated by a
    # Python peer that hands over the uffd of a forked child and closes the socket.
    async with serving(sock_path, ZeroBackend(), keep_after_eof=True) as server:
        uffd = Userfaultfd.open()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(sock_path)
            socket.send_fds(s, [json.dumps([mapping()]).encode()], [uffd.fd])
        finally:
            uffd.close()
        await server.wait_clients(1)
        s.close()
        await asyncio.sleep(0.2)
        assert len(server.clients) == 1  # the peer (this process) is still alive
    assert server.stats.closed == 1  # released when the server closed


_EARLY_CLOSER = """
import json, socket, sys, time
from uffd_aio.uffd import Userfaultfd
uffd = Userfaultfd.open()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
m = [{"base_host_virt_addr": 0x7f0000000000, "size": 65536, "offset": 0, "page_size": 4096}]
socket.send_fds(s, [json.dumps(m).encode()], [uffd.fd])
s.close()            # like a VMM that drops the socket after the handoff
print("sent", flush=True)
sys.stdin.read()     # live until the test closes our stdin
"""


async def test_keep_after_eof_releases_on_process_exit(sock_path: str) -> None:
    with capture_logs() as logs:
        async with serving(sock_path, ZeroBackend(), keep_after_eof=True) as server, \
                children() as kids:
            p = await asyncio.create_subprocess_exec(
                str(ROOT / ".venv" / "bin" / "python"), "-c", _EARLY_CLOSER, sock_path,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            kids.procs.append(p)
            assert p.stdout is not None and p.stdin is not None
            async with asyncio.timeout(limit(20)):
                while (line := await p.stdout.readline()) != b"sent\n":  # structlog prints too
                    assert line, "the child exited before sending"
            await server.wait_clients(1)
            await asyncio.sleep(0.3)
            assert len(server.clients) == 1  # socket closed, process alive: still served
            p.stdin.close()
            await p.wait()
            await server.wait_clients(0)  # the pidfd saw the exit
    released = [e for e in logs if e["event"] == "uffd_aio.client_released"]
    assert released and released[0]["reason"] == "process exited"
    assert any(e["event"] == "uffd_aio.client_eof_kept" for e in logs)


# ---- metrics ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_metrics_endpoint(workload: Path, sock_path: str) -> None:
    pytest.importorskip("prometheus_client")
    async with serving(sock_path, SlowBackend(0)) as server, children() as kids:
        port = _free_port()
        assert start_metrics(server, port)
        p = await kids.start(*workload_args(workload, sock_path, 256, 2, 1))
        rc, out, err = await kids.finish(p)
        assert rc == 0, (out, err)
        await server.wait_clients(0)
        await asyncio.sleep(1.2)  # the snapshot the HTTP thread reads refreshes every second

        def get() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text: str = r.read().decode()
                return text

        text = await asyncio.to_thread(get)
    assert "uffd_aio_clients 0.0" in text
    assert "uffd_aio_served_total 1.0" in text
    assert "uffd_aio_faults_total 256.0" in text
    assert "uffd_aio_python_faults_total 256.0" in text  # not a file/zero backend
    assert "uffd_aio_native_faults_total 0.0" in text


# ---- the command ---------------------------------------------------------------------------


async def test_uffd_aio_serve_command(workload: Path, snapshot: Path, sock_path: str) -> None:
    async with children() as kids:
        server = await kids.start(ROOT / ".venv" / "bin" / "python", "-m", "uffd_aio", "-v",
                                  "serve", "--socket", sock_path, "--backend",
                                  f"file:{snapshot}", "--readahead", "adaptive",
                                  "--allow-uid", os.getuid(), "--loop", "asyncio")
        async with asyncio.timeout(limit(60)):  # start-up is slow under TCG (the VM lane)
            while not _exists(sock_path):
                assert server.returncode is None, "uffd-aio serve exited at start-up"
                await asyncio.sleep(0.05)
        p = await kids.start(*workload_args(workload, sock_path, 1024, 4, 2))
        rc, out, err = await kids.finish(p)
        assert rc == 0 and parse(out)["verified"] is True, (out, err)
        server.send_signal(signal.SIGTERM)
        rc, out, err = await kids.finish(server, timeout=10)
        assert rc == 0, err
        assert "uffd_aio.client_released" in err and "served=1" in err
        assert not _exists(sock_path)  # removed on close


async def test_uffd_aio_serve_bad_backend(sock_path: str) -> None:
    async with children() as kids:
        p = await kids.start(ROOT / ".venv" / "bin" / "python", "-m", "uffd_aio", "serve",
                             "--socket", sock_path, "--backend", "file:/nonexistent/mem")
        rc, _, err = await kids.finish(p, timeout=20)
    assert rc == 2 and "cannot open the snapshot file" in err


def test_snapshot_restore_example(vmm: Path) -> None:
    """examples/snapshot_restore/run.sh end to end (smaller memory)."""
    env = {**os.environ, "MIB": "16", "THREADS": "4"}
    # its own process group: on a timeout the server and VMMs it started die with it
    p = subprocess.Popen([str(ROOT / "examples" / "snapshot_restore" / "run.sh")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=CHILD_WAIT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"run.sh did not finish within {CHILD_WAIT} s (killed)\n{out}\n{err}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == 0, out + err
    assert "snapshot restore example: OK" in out
    assert out.count("content check against the snapshot: ok") == 4
    assert "given back and touched again, read as the snapshot: ok" in out


async def test_metrics_without_prometheus_client(sock_path: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    async with serving(sock_path, ZeroBackend()) as server:
        assert start_metrics(server, _free_port()) is False
    assert "pip install 'uffd-aio[metrics]'" in capsys.readouterr().err


# ---- the native engine (file: and zero backends) --------------------------------------------


def _nonzero_pattern_words(pages: int) -> int:
    words = memoryview(testing.pattern_bytes(0, pages * PS)).cast("Q")
    return sum(1 for w in words if w)


@pytest.mark.parametrize("kind", ["file", "zero"])
async def test_native_four_clients_four_threads(workload: Path, snapshot: Path, sock_path: str,
                                                kind: str) -> None:
    """file: and zero are served by the engine in C; the C clients verify the bytes."""
    backend: Any = await FileBackend.open(snapshot) if kind == "file" else ZeroBackend()
    pages = 2048
    try:
        # remove="zero" on a zero backend changes nothing: it stays native
        with capture_logs() as logs:
            async with serving(sock_path, backend, remove="zero" if kind == "zero" else
                               "refetch") as server, children() as kids:
                procs = [await kids.start(*workload_args(workload, sock_path, pages, 4, 2,
                                                         "--label", f"c{i}"))
                         for i in range(4)]
                results = await asyncio.gather(*(kids.finish(p) for p in procs))
                await server.wait_clients(0)
        for rc, out, err in results:
            doc = parse(out)
            assert doc["threads"] == 4 and doc["pages"] == pages
            if kind == "file":
                assert rc == 0 and doc["verified"] is True and doc["bad_words"] == 0, err
            else:  # zero pages: every word that the pattern has non-zero differs from it
                assert rc == 1 and doc["bad_words"] == _nonzero_pattern_words(pages), err
        st = server.stats
        assert (st.served, st.closed, st.errors) == (4, 4, 0)
        assert st.native_regions == 8 and st.python_regions == 0
        assert st.native_faults >= 4 * pages and st.native_faults <= st.faults
        assert st.resolved_bytes >= 4 * pages * PS
        released = [e for e in logs if e["event"] == "uffd_aio.client_released"]
        assert len(released) == 4
        assert all(e["path"] == "native" and e["native_faults"] >= pages for e in released)
    finally:
        await backend.aclose()


async def test_no_native_uses_python(workload: Path, snapshot: Path, sock_path: str) -> None:
    backend = await FileBackend.open(snapshot)
    try:
        async with serving(sock_path, backend, native=False) as server, children() as kids:
            rc, out, err = await kids.finish(
                await kids.start(*workload_args(workload, sock_path, 1024, 4, 2)))
            assert rc == 0 and parse(out)["verified"] is True, (out, err)
            await server.wait_clients(0)
        st = server.stats
        assert st.native_faults == 0 and st.native_regions == 0 and st.python_regions == 2
        assert st.python_faults >= 1024 and st.resolved_bytes == 1024 * PS
    finally:
        await backend.aclose()
    assert backend.reads > 0


async def test_native_balloon_refetch_and_readahead(workload: Path, snapshot: Path,
                                                    sock_path: str) -> None:
    """REMOVE events (MADV_DONTNEED churn) on native regions: the pages are served again
    from the file and read as the snapshot; --readahead adaptive is the engine's window."""
    backend = await FileBackend.open(snapshot)
    try:
        with capture_logs() as logs:
            async with serving(sock_path, backend, attach_options={"readahead": "adaptive"}
                               ) as server, children() as kids:
                rc, out, err = await kids.finish(await kids.start(
                    *workload_args(workload, sock_path, 2048, 2, 2, "--churn-ms", 500)))
                assert rc == 0, (out, err)
                doc = parse(out)
                assert doc["verified"] is True and doc["churn"]["bad_reads"] == 0
                assert doc["churn"]["madvises"] > 0
                await server.wait_clients(0)
        released = [e for e in logs if e["event"] == "uffd_aio.client_released"]
        assert released[0]["path"] == "native" and released[0]["removes"] >= 1
        assert released[0]["native_faults"] > 0
        windows = {e["readahead"] for e in logs if e["event"] == "uffd_aio.native_region"}
        assert windows == {(1, 64)}  # AdaptiveWindow(): 1..64 pages
    finally:
        await backend.aclose()


async def test_native_truncated_snapshot_gives_sigbus(workload: Path, tmp_path: Path,
                                                      sock_path: str,
                                                      monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """A snapshot truncated under a natively served client: the engine passes the pages
    past the new end up to Python, whose policy (poison) makes the client's thread SIGBUS."""
    snap = tmp_path / "mem.snap"
    pages = 1024
    snap.write_bytes(testing.pattern_bytes(0, pages * PS))
    backend = await FileBackend.open(snap)
    try:
        async with serving(sock_path, backend) as server, children() as kids:
            serve_region = server._serve_region

            def then_truncate(client: Any, region: Any, store_offset: int) -> None:
                serve_region(client, region, store_offset)
                os.truncate(snap, pages // 4 * PS)  # before any of its faults is served

            monkeypatch.setattr(server, "_serve_region", then_truncate)
            # one thread, in order: the pages before the new end are faulted (natively)
            # before the first one past it
            rc, out, err = await kids.finish(
                await kids.start(*workload_args(workload, sock_path, pages, 1, 1)))
            assert rc == -signal.SIGBUS, (rc, out, err)
            await server.wait_clients(0)
        st = server.stats
        assert st.native_regions == 1 and st.errors >= 1
        assert st.native_faults >= pages // 4  # pages before the new end were served in C
    finally:
        await backend.aclose()


def test_serve_no_native_flag() -> None:
    import argparse

    from uffd_aio.server import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--socket", "s", "--backend", "zero"]
    assert parser.parse_args(base).native is True
    assert parser.parse_args([*base, "--no-native"]).native is False
