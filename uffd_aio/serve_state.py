"""Per-client state of ``uffd-aio serve --state-dir`` (pure format + atomic files).

Everything a restarted (or upgraded) server needs to serve a client again, one
JSON file per client in ``STATE_DIR/clients/``::

    {"magic": "uffd-aio/serve-state", "version": 1,
     "backend": "file:/snap/mem|dev=2049,ino=1234,size=134217728,mtime_ns=...",
     "pid": 4242, "start_time": 123456, "uid": 1000, "gid": 1000,
     "key": "4242-123456", "fds": ["4242-123456.uffd", "4242-123456.sock"],
     "mappings": [{"base_host_virt_addr": ..., "size": ..., "offset": ..., "page_size": 4096}],
     "removed": [[start, end], ...], "removes": 3, "adopted_at": 1700000000.0,
     "generation": 2, "checksum": "sha256 of the canonical JSON of everything else"}

* ``pid`` + ``start_time`` (field 22 of ``/proc/PID/stat``, clock ticks after boot)
  identify the process *instance*: a recycled pid has another start time.
* ``backend`` is the fingerprint of the backend the state was written for
  (:func:`backend_fingerprint`): a server with another backend, or a snapshot file that
  was replaced or modified, refuses the state (serving other bytes to a half-restored
  guest would corrupt it silently).
* ``fds`` name the client's file descriptors in the fd store (the fd keeper or
  systemd's fd store): the uffd and, when kept, the client's connection.
* ``mappings`` are the handoff's mappings, validated again on load exactly like a
  handoff (:func:`uffd_aio.handoff_proto.parse_mappings`).
* ``checksum`` catches a truncated, bit-flipped or hand-edited file.

:func:`decode` raises :class:`StateError` (and nothing else) for any bytes; files are
written with :func:`write_atomic` (temp file + fsync + rename + fsync of the directory),
so a reader sees the old or the new file, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Final

import attrs

from uffd_aio.handoff_proto import HandoffError, Mapping, parse_mappings

__all__ = ["FORMAT_VERSION", "MAGIC", "ClientState", "StateError", "backend_fingerprint",
           "decode", "encode", "process_start_time", "write_atomic"]

MAGIC: Final = "uffd-aio/serve-state"
FORMAT_VERSION: Final = 1
#: a state file is small; anything larger is not ours
MAX_STATE_BYTES: Final = 1 << 20
_KEY = re.compile(r"^[0-9]{1,10}-[0-9]{1,20}$")
_FD_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")  # systemd's FDNAME rules, and more


class StateError(Exception):
    """A state file that is not a valid one of ours for this backend; says why."""


@attrs.frozen
class ClientState:
    """What a server needs to serve one client again."""

    pid: int
    start_time: int
    uid: int
    gid: int
    backend: str
    mappings: tuple[Mapping, ...]
    fds: tuple[str, ...]
    removed: tuple[tuple[int, int], ...] = ()
    removes: int = 0
    adopted_at: float = 0.0
    generation: int = 0

    @property
    def key(self) -> str:
        return client_key(self.pid, self.start_time)


def client_key(pid: int, start_time: int) -> str:
    return f"{pid}-{start_time}"


def _body(st: ClientState) -> dict[str, object]:
    return {
        "magic": MAGIC,
        "version": FORMAT_VERSION,
        "backend": st.backend,
        "key": st.key,
        "pid": st.pid,
        "start_time": st.start_time,
        "uid": st.uid,
        "gid": st.gid,
        "fds": list(st.fds),
        "mappings": [{"base_host_virt_addr": m.base_host_virt_addr, "size": m.size,
                      "offset": m.offset, "page_size": m.page_size} for m in st.mappings],
        "removed": [[s, e] for s, e in st.removed],
        "removes": st.removes,
        "adopted_at": st.adopted_at,
        "generation": st.generation,
    }


def _checksum(body: dict[str, object]) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def encode(st: ClientState) -> bytes:
    body = _body(st)
    body["checksum"] = _checksum(body)
    return (json.dumps(body, sort_keys=True) + "\n").encode()


def _int(doc: dict[str, object], key: str, *, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    v = doc.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise StateError(f"field {key!r} must be an integer in [{lo}, {hi}], got {v!r:.60}")
    return v


def decode(data: bytes, *, backend: str | None = None) -> ClientState:
    """Parse and check a state file; ``backend``: the fingerprint it must belong to.

    Raises :class:`StateError` for anything but a valid state of this format version
    (and of ``backend``, when given); never anything else.
    """
    try:
        return _decode(data, backend)
    except StateError:
        raise
    except (ValueError, TypeError, ArithmeticError, RecursionError, MemoryError,
            KeyError, AttributeError) as exc:
        raise StateError(f"unparseable state ({type(exc).__name__}: {exc!s:.200})") from None


def _decode(data: bytes, backend: str | None) -> ClientState:
    if len(data) > MAX_STATE_BYTES:
        raise StateError(f"{len(data)} bytes: larger than any state file ({MAX_STATE_BYTES})")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise StateError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise StateError(f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
                         ) from None
    if not isinstance(doc, dict):
        raise StateError(f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("magic") != MAGIC:
        raise StateError(f"not a uffd-aio serve state file (magic {doc.get('magic')!r:.60})")
    if doc.get("version") != FORMAT_VERSION:
        raise StateError(f"state format version {doc.get('version')!r:.20} is not the "
                         f"supported version {FORMAT_VERSION}")
    checksum = doc.pop("checksum", None)
    if not isinstance(checksum, str) or checksum != _checksum(doc):
        raise StateError("checksum mismatch: the file is corrupt or was edited")
    fp = doc.get("backend")
    if not isinstance(fp, str):
        raise StateError("field 'backend' must be a string")
    if backend is not None and fp != backend:
        raise StateError(f"written for another backend or snapshot ({fp!r:.200}), "
                         f"this server serves {backend!r:.200}")
    pid = _int(doc, "pid", lo=1, hi=(1 << 31) - 1)
    start_time = _int(doc, "start_time")
    if doc.get("key") != client_key(pid, start_time) or not _KEY.match(str(doc.get("key"))):
        raise StateError(f"field 'key' {doc.get('key')!r:.60} does not match pid and "
                         "start_time")
    fds = doc.get("fds")
    if (not isinstance(fds, list) or not 1 <= len(fds) <= 4
            or not all(isinstance(n, str) and _FD_NAME.match(n) for n in fds)):
        raise StateError(f"field 'fds' must be 1 to 4 fd names, got {fds!r:.100}")
    try:
        mappings = parse_mappings(json.dumps(doc.get("mappings")).encode())
    except HandoffError as exc:
        raise StateError(f"mappings: {exc}") from None
    removed = doc.get("removed")
    if not isinstance(removed, list):
        raise StateError("field 'removed' must be a list of [start, end] pairs")
    pairs: list[tuple[int, int]] = []
    for r in removed:
        if (not isinstance(r, list) or len(r) != 2 or not all(type(x) is int for x in r)
                or not 0 <= r[0] < r[1] < (1 << 64)):
            raise StateError(f"field 'removed': {r!r:.60} is not a [start, end) pair")
        pairs.append((r[0], r[1]))
    adopted_at = doc.get("adopted_at")
    if not isinstance(adopted_at, int | float) or isinstance(adopted_at, bool):
        raise StateError("field 'adopted_at' must be a number")
    return ClientState(pid=pid, start_time=start_time, uid=_int(doc, "uid", hi=(1 << 32) - 1),
                       gid=_int(doc, "gid", hi=(1 << 32) - 1), backend=fp, mappings=mappings,
                       fds=tuple(fds), removed=tuple(pairs), removes=_int(doc, "removes"),
                       adopted_at=float(adopted_at), generation=_int(doc, "generation"))


def backend_fingerprint(name: str, path: str | None = None) -> str:
    """What a state file must match: the backend's name and, for a file, its identity.

    A snapshot file that was replaced (another inode) or modified in place (size or
    mtime) no longer matches: a restarted server refuses to serve its clients other
    bytes than the first server did.
    """
    if path is None:
        return name
    st = os.stat(path)
    return f"{name}|dev={st.st_dev},ino={st.st_ino},size={st.st_size},mtime_ns={st.st_mtime_ns}"


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the last ')'
    rest = text[text.rindex(b")") + 2:].split()
    state = rest[0]
    if state in (b"Z", b"X"):  # a zombie's memory is gone already
        return None
    return int(rest[19])  # field 22


def alive(pid: int, start_time: int) -> bool:
    """True if process ``pid`` is still the instance that started at ``start_time``."""
    return process_start_time(pid) == start_time


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory."""
    d = os.path.dirname(path) or "."
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(d)


def fsync_dir(d: str) -> None:
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def ranges(pairs: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(s), int(e)) for s, e in pairs)


def fd_names(key: str, with_socket: bool) -> Sequence[str]:
    return (f"{key}.uffd", f"{key}.sock") if with_socket else (f"{key}.uffd",)
