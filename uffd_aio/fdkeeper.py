"""Keep clients' uffds alive outside ``uffd-aio serve``, so a restarted server takes them back.

Two stores, one interface (:class:`FdStore`: ``put``/``take``/``drop``/``names``):

* :class:`SystemdStore`, when the server runs under systemd (``NOTIFY_SOCKET`` set):
  ``sd_notify("FDSTORE=1\\nFDNAME=NAME\\nFDPOLL=0")`` with the fd as SCM_RIGHTS (the
  datagram is built here: no libsystemd); the unit needs ``FileDescriptorStoreMax=``
  (e.g. 4096).  A restarted server gets them back from ``LISTEN_FDS`` /
  ``LISTEN_FDNAMES`` (:func:`listen_fds`).  ``FDPOLL=0``: systemd must not drop a uffd
  when it polls as readable/erroneous.
* :class:`KeeperStore` otherwise: a tiny process (this file run as a script, stdlib
  only) that ``serve`` starts in a session of its own, so it outlives the server.  It
  listens on ``STATE_DIR/fdkeeper.sock`` (SOCK_SEQPACKET, mode 0600, peers of another
  uid refused), holds the fds it is given and hands duplicates back on request.  It
  never reads, polls or otherwise touches the uffds: it only holds them.  It drops the
  fds of a client whose process has exited (pid + start time given with ``put``), and
  exits when it holds no fds and no server has been connected for ``--idle`` seconds.

Messages (both directions) are one JSON object per datagram, with fds as SCM_RIGHTS:
``{"op": "put", "name": N, "pid": P, "start_time": T}`` + fds -> ``{"ok": true}``;
``{"op": "take", "name": N}`` -> ``{"ok": true}`` + duplicates of the fds (the keeper
keeps its own); ``{"op": "drop", "name": N}``; ``{"op": "names"}`` ->
``{"ok": true, "names": [...]}``.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = [
    "FdStore",
    "KeeperStore",
    "StoreError",
    "SystemdStore",
    "listen_fds",
    "recv_msg",
    "sd_notify",
    "send_msg",
]

KEEPER_SOCKET = "fdkeeper.sock"
KEEPER_PIDFILE = "fdkeeper.pid"
MAX_MSG = 1 << 16
MAX_FDS = 64
_UCRED = struct.Struct("3i")


class StoreError(Exception):
    """The fd store could not do what was asked (says why)."""


# ---- messages -----------------------------------------------------------------------------


def send_msg(sock: socket.socket, obj: Mapping[str, object], fds: Sequence[int] = ()) -> None:
    data = json.dumps(obj).encode()
    if len(data) > MAX_MSG:
        raise StoreError(f"message of {len(data)} bytes is too large")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds \
        else []
    sock.sendmsg([data], anc)


def recv_msg(sock: socket.socket) -> tuple[dict[str, object] | None, list[int]]:
    """One message: (object, fds), or (None, []) at EOF.  Bad JSON: StoreError (fds closed)."""
    data, ancdata, flags, _ = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(MAX_FDS * 4),
                                           socket.MSG_CMSG_CLOEXEC)
    fds = fds_of(ancdata)
    if not data and not fds:
        return None, []
    try:
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise StoreError("message truncated")
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise StoreError("message is not a JSON object")
    except (ValueError, StoreError) as exc:
        close_all(fds)
        raise StoreError(f"bad message: {exc}") from None
    return obj, fds


def fds_of(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """The file descriptors of a recvmsg's SCM_RIGHTS ancillary data."""
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(blob[: len(blob) - len(blob) % a.itemsize])
            fds.extend(a)
    return fds


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def peer_uid(sock: socket.socket) -> int:
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                              _UCRED.size))
    return int(uid)


# ---- the interface the server uses --------------------------------------------------------


class FdStore(Protocol):
    kind: str

    def put(self, name: str, fds: Sequence[int], pid: int, start_time: int) -> None: ...

    def take(self, name: str) -> list[int] | None:
        """Duplicates of the fds stored under ``name`` (the caller owns them), or None."""
        ...

    def drop(self, name: str) -> None: ...

    def names(self) -> list[str]: ...

    def close(self) -> None: ...


# ---- systemd ------------------------------------------------------------------------------


def sd_notify(state: str, fds: Sequence[int] = (), *,
              env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (and ``fds``) to ``$NOTIFY_SOCKET``; False when it is not set."""
    addr = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]  # abstract namespace
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        s.sendmsg([state.encode()], anc, 0, addr)
    finally:
        s.close()
    return True


def listen_fds(env: Mapping[str, str] | None = None, pid: int | None = None
               ) -> list[tuple[str, int]]:
    """The fds systemd passed (``LISTEN_FDS`` from 3 on, ``LISTEN_FDNAMES``), if for us."""
    env = env if env is not None else os.environ
    pid = os.getpid() if pid is None else pid
    try:
        if int(env.get("LISTEN_PID", "0")) != pid:
            return []
        n = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    out = []
    for i in range(max(0, min(n, 65536))):
        out.append((names[i] if i < len(names) else "unknown", 3 + i))
    return out


class SystemdStore:
    """systemd's file-descriptor store (``FileDescriptorStoreMax=`` in the unit)."""

    kind = "systemd"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = dict(env if env is not None else os.environ)
        self._inherited: dict[str, list[int]] = {}
        for name, fd in listen_fds(self._env):
            os.set_inheritable(fd, False)
            self._inherited.setdefault(name, []).append(fd)
        for k in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"):
            os.environ.pop(k, None)  # not for our children

    def put(self, name: str, fds: Sequence[int], pid: int, start_time: int) -> None:
        # one name per fd: LISTEN_FDNAMES then says which is which
        for i, fd in enumerate(fds):
            if not sd_notify(f"FDSTORE=1\nFDNAME={name}.{i}\nFDPOLL=0", [fd], env=self._env):
                raise StoreError("NOTIFY_SOCKET is not set")

    def take(self, name: str) -> list[int] | None:
        out: list[int] = []
        for i in range(4):
            got = self._inherited.pop(f"{name}.{i}", [])
            out.extend(got[:1])
            close_all(got[1:])
        return out or None

    def drop(self, name: str) -> None:
        for i in range(4):
            sd_notify(f"FDSTOREREMOVE=1\nFDNAME={name}.{i}", env=self._env)
            close_all(self._inherited.pop(f"{name}.{i}", []))

    def names(self) -> list[str]:
        return sorted({n.rpartition(".")[0] for n in self._inherited})

    def close(self) -> None:
        for fds in self._inherited.values():
            close_all(fds)
        self._inherited.clear()


# ---- the keeper process: client side --------------------------------------------------------


class KeeperStore:
    """Talk to the fd keeper of ``state_dir`` (started if none runs)."""

    kind = "keeper"

    def __init__(self, state_dir: str, *, idle: float = 30.0, timeout: float = 5.0) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, KEEPER_SOCKET)
        self.idle = idle
        self.timeout = timeout
        self.started_keeper: int | None = None
        self._sock = self._connect() or self._spawn()

    def _connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            return None
        except BaseException:
            s.close()
            raise
        return s

    def _spawn(self) -> socket.socket:
        log = os.open(os.path.join(self.state_dir, "fdkeeper.log"),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            p = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), "--dir", self.state_dir,
                 "--idle", str(self.idle)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True, close_fds=True)  # outlives us, not our signals
        finally:
            os.close(log)
        self.started_keeper = p.pid
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            s = self._connect()
            if s is not None:
                return s
            if p.poll() is not None and p.returncode != 0:
                raise StoreError(f"the fd keeper exited with status {p.returncode} (see "
                                 f"{self.state_dir}/fdkeeper.log)")
            time.sleep(0.01)
        raise StoreError(f"the fd keeper did not listen on {self.path} within "
                         f"{self.timeout} s")

    def _call(self, obj: Mapping[str, object], fds: Sequence[int] = ()
              ) -> tuple[dict[str, object], list[int]]:
        try:
            send_msg(self._sock, obj, fds)
            reply, got = recv_msg(self._sock)
        except OSError as exc:
            raise StoreError(f"fd keeper: {exc}") from None
        if reply is None:
            raise StoreError("the fd keeper closed the connection")
        if not reply.get("ok"):
            close_all(got)
            raise StoreError(f"fd keeper: {reply.get('error')}")
        return reply, got

    def put(self, name: str, fds: Sequence[int], pid: int, start_time: int) -> None:
        self._call({"op": "put", "name": name, "pid": pid, "start_time": start_time}, fds)

    def take(self, name: str) -> list[int] | None:
        try:
            _, fds = self._call({"op": "take", "name": name})
        except StoreError as exc:
            if "no fds named" in str(exc):
                return None
            raise
        return fds

    def drop(self, name: str) -> None:
        self._call({"op": "drop", "name": name})

    def names(self) -> list[str]:
        reply, _ = self._call({"op": "names"})
        names = reply.get("names", [])
        if not isinstance(names, list):
            raise StoreError(f"fd keeper: bad names reply {names!r}")
        return [str(n) for n in names]

    def close(self) -> None:
        self._sock.close()


# ---- the keeper process ------------------------------------------------------------------------


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    rest = text[text.rindex(b")") + 2:].split()
    return None if rest[0] in (b"Z", b"X") else int(rest[19])


class _Keeper:
    def __init__(self, state_dir: str, idle: float) -> None:
        self.path = os.path.join(state_dir, KEEPER_SOCKET)
        self.pidfile = os.path.join(state_dir, KEEPER_PIDFILE)
        self.idle = idle
        #: name -> (pid, start_time, fds)
        self.held: dict[str, tuple[int, int, list[int]]] = {}
        self.sel = selectors.DefaultSelector()
        self.conns: set[socket.socket] = set()
        self.last_seen = time.monotonic()
        self.uid = os.getuid()

    def log(self, what: str, **kw: object) -> None:
        print(json.dumps({"event": f"uffd_aio.fdkeeper_{what}", "pid": os.getpid(), **kw}),
              file=sys.stderr, flush=True)

    def listen(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.connect(self.path)
            return False  # another keeper serves this directory
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        finally:
            probe.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            ls.bind(self.path)
        finally:
            os.umask(old)
        ls.listen(16)
        ls.setblocking(False)
        self.sel.register(ls, selectors.EVENT_READ, None)
        with open(self.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
        return True

    def run(self) -> int:
        if not self.listen():
            self.log("already_running", path=self.path)
            return 0
        self.log("started", path=self.path)
        while True:
            for key, _ in self.sel.select(timeout=1.0):
                if key.data is None:
                    self.accept(key.fileobj)  # type: ignore[arg-type]
                else:
                    self.serve(key.data)
            self.reap()
            if not self.held and not self.conns and \
                    time.monotonic() - self.last_seen > self.idle:
                self.log("exiting", reason="no fds held and no server connected")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.pidfile)
                return 0

    def accept(self, ls: socket.socket) -> None:
        try:
            c, _ = ls.accept()
        except BlockingIOError:
            return
        if peer_uid(c) != self.uid:
            c.close()
            self.log("refused", reason="peer of another uid")
            return
        c.setblocking(True)
        c.settimeout(5.0)
        self.conns.add(c)
        self.sel.register(c, selectors.EVENT_READ, c)
        self.last_seen = time.monotonic()

    def serve(self, c: socket.socket) -> None:
        self.last_seen = time.monotonic()
        try:
            msg, fds = recv_msg(c)
        except (OSError, StoreError) as exc:
            self.log("bad_request", error=str(exc))
            msg, fds = None, []
        if msg is None:
            self.sel.unregister(c)
            self.conns.discard(c)
            c.close()
            return
        try:
            reply, out = self.handle(msg, fds)
        except Exception as exc:
            close_all(fds)
            reply, out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, []
        try:
            send_msg(c, reply, out)
        except OSError as exc:
            self.log("reply_failed", error=str(exc))
        finally:
            if msg.get("op") == "take":
                close_all(out)  # duplicates: the peer has its own now

    def handle(self, msg: dict[str, object], fds: list[int]) -> tuple[dict[str, object], list[int]]:
        op, name = msg.get("op"), msg.get("name")
        if op == "names":
            return {"ok": True, "names": sorted(self.held)}, []
        if not isinstance(name, str) or not name:
            close_all(fds)
            return {"ok": False, "error": "a name is needed"}, []
        if op == "put":
            pid, st = msg.get("pid"), msg.get("start_time")
            if type(pid) is not int or type(st) is not int or not fds:
                close_all(fds)
                return {"ok": False, "error": "put needs pid, start_time and fds"}, []
            old = self.held.pop(name, None)
            if old is not None:
                close_all(old[2])
            self.held[name] = (pid, st, fds)
            return {"ok": True}, []
        if op == "take":
            close_all(fds)
            entry = self.held.get(name)
            if entry is None:
                return {"ok": False, "error": f"no fds named {name!r}"}, []
            return {"ok": True}, [os.dup(fd) for fd in entry[2]]
        if op == "drop":
            close_all(fds)
            entry = self.held.pop(name, None)
            if entry is not None:
                close_all(entry[2])
            return {"ok": True}, []
        close_all(fds)
        return {"ok": False, "error": f"unknown op {op!r}"}, []

    def reap(self) -> None:
        for name, (pid, st, fds) in list(self.held.items()):
            if _start_time(pid) != st:
                del self.held[name]
                close_all(fds)
                self.log("dropped", name=name, reason="process exited")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="uffd-aio-fdkeeper",
                                description="hold uffds for uffd-aio serve --state-dir")
    p.add_argument("--dir", required=True)
    p.add_argument("--idle", type=float, default=30.0,
                   help="exit after this many seconds with no fds and no server (30)")
    a = p.parse_args(argv)
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server's terminal's ^C is not for us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return _Keeper(a.dir, a.idle).run()


if __name__ == "__main__":
    sys.exit(main())
