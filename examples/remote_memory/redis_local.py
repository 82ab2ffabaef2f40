"""A throwaway local redis-server for examples and tests.

``LocalRedis`` starts Debian's ``/usr/bin/redis-server`` on a free port of
127.0.0.1, with its working directory, socket-free config and log in a
temporary directory, and stops it (SIGTERM, then SIGKILL) on exit.
``kill()`` + ``start()`` simulate a crash and restart; with
``persist=True`` a ``save()`` before the crash brings the data back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType

from uffd_aio.errors import MissingExtra

try:
    import redis
except ImportError as _exc:  # redis-py is the optional extra [redis]
    raise MissingExtra("redis", "redis", "examples.remote_memory.redis_local") from _exc

__all__ = ["REDIS_SERVER", "LocalRedis", "LocalRedisCluster", "RedisNotInstalled",
           "RedisUnavailable", "free_port"]

REDIS_SERVER = os.environ.get("UFFD_AIO_REDIS_SERVER", "/usr/bin/redis-server")


class RedisUnavailable(RuntimeError):
    """redis-server is not installed or would not start."""


class RedisNotInstalled(RedisUnavailable):
    """There is no redis-server executable."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """A redis-server child process on 127.0.0.1:``port`` (free port by default)."""

    def __init__(self, *, port: int | None = None, directory: str | None = None,
                 persist: bool = False, maxmemory: str | None = None,
                 executable: str = REDIS_SERVER) -> None:
        if not (os.path.exists(executable) or shutil.which(executable)):
            raise RedisNotInstalled(
                f"{executable} not found: install it with `apt-get install redis-server` "
                "(or set UFFD_AIO_REDIS_SERVER)")
        self.executable = executable
        self._auto_port = port is None
        self._started_once = False
        self.port = port or free_port()
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="uffd-aio-redis-")
        os.makedirs(self.directory, exist_ok=True)
        self.persist = persist
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "redis.log")

    def _args(self) -> list[str]:
        args = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.directory, "--logfile", self.log_path,
                "--daemonize", "no", "--protected-mode", "no", "--appendonly", "no",
                "--save", "", "--dbfilename", "dump.rdb", "--unixsocket", ""]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory]
        return args

    def start(self, timeout: float = 10.0) -> LocalRedis:
        """Start (or restart) the server and wait until it answers PING (dataset loaded).

        A port picked automatically that another process grabbed meanwhile is replaced
        by a new free one (a few times)."""
        for attempt in range(5):
            try:
                return self._start(timeout)
            except RedisUnavailable:
                # a restart keeps its port: clients know it
                if not (self._auto_port and not self._started_once and attempt < 4 and
                        "Address already in use" in self._log_tail()):
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> LocalRedis:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(self._args(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2,
                             socket_timeout=1.0)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RedisUnavailable(f"redis-server exited with {self.proc.returncode}; "
                                           f"log: {self._log_tail()}")
                try:
                    if client.ping():
                        self._started_once = True
                        return self
                except redis.exceptions.BusyLoadingError:
                    pass
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RedisUnavailable(f"redis-server on port {self.port} did not answer "
                                           f"within {timeout} s; log: {self._log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-600:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def save(self) -> None:
        """SAVE the dataset to dump.rdb (so a restart after :meth:`kill` loads it)."""
        with redis.Redis(host="127.0.0.1", port=self.port) as c:
            c.save()

    def kill(self) -> None:
        """SIGKILL the server (a crash) and reap it."""
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)

    def stop(self) -> None:
        """SIGTERM (no save: ``--save ""``), SIGKILL after 5 s."""
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def used_memory(self) -> int:
        with redis.Redis(host="127.0.0.1", port=self.port) as c:
            info = c.info("memory")
            return int(info["used_memory"])

    def __enter__(self) -> LocalRedis:
        try:
            return self.start()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _free_cluster_port() -> int:
    """A free port P <= 55535 whose cluster bus port P + 10000 is free too."""
    for _ in range(200):
        p = free_port()
        if p > 55535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        return p
    raise RedisUnavailable("no free port pair for a cluster node")


class LocalRedisCluster:
    """``masters`` redis-servers in cluster mode on free ports, joined with
    ``redis-cli --cluster create`` (no replicas); for tests of ``redis+cluster://``."""

    def __init__(self, *, masters: int = 3, directory: str | None = None,
                 executable: str = REDIS_SERVER, cli: str | None = None) -> None:
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="uffd-aio-redis-cluster-")
        cli = cli or os.path.join(os.path.dirname(executable), "redis-cli")
        if not os.path.exists(cli):
            raise RedisNotInstalled(f"{cli} not found (Debian package redis-tools)")
        self.cli = cli
        self.nodes = [_ClusterNode(port=_free_cluster_port(),
                                   directory=os.path.join(self.directory, f"node{i}"),
                                   executable=executable)
                      for i in range(masters)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def start(self, timeout: float = 20.0) -> LocalRedisCluster:
        try:
            for n in self.nodes:
                n.start()
            subprocess.run([self.cli, "--cluster", "create",
                            *[f"127.0.0.1:{n.port}" for n in self.nodes], "--cluster-yes"],
                           check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=timeout)
            deadline = time.monotonic() + timeout
            while True:
                with redis.Redis(host="127.0.0.1", port=self.nodes[0].port) as c:
                    info = c.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" in text:
                    return self
                if time.monotonic() > deadline:
                    raise RedisUnavailable(f"cluster not ready after {timeout} s: {text[:200]}")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for n in self.nodes:
            n.kill()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _ClusterNode(LocalRedis):
    def _args(self) -> list[str]:
        return [*super()._args(), "--cluster-enabled", "yes", "--cluster-config-file",
                os.path.join(self.directory, "nodes.conf")]
