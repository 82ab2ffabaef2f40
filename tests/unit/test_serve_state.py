"""The state format of ``serve --state-dir`` and the fd stores, without the kernel's uffd."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uffd_aio import fdkeeper
from uffd_aio.handoff_proto import Mapping
from uffd_aio.serve_state import (
    FORMAT_VERSION,
    ClientState,
    StateError,
    alive,
    backend_fingerprint,
    decode,
    encode,
    process_start_time,
    write_atomic,
)

pytestmark = pytest.mark.timeout(60)

FP = "file:/snap/mem|dev=1,ino=2,size=3,mtime_ns=4"


def _state(**kw: object) -> ClientState:
    base: dict[str, object] = dict(
        pid=4242, start_time=123456, uid=1000, gid=1000, backend=FP,
        mappings=(Mapping(0x7F0000000000, 0x10000, 0, 4096),
                  Mapping(0x7F0000100000, 0x2000, 0x10000, 4096)),
        fds=("4242-123456",), removed=((0x7F0000000000, 0x7F0000001000),), removes=1,
        adopted_at=1.5, generation=3)
    base.update(kw)
    return ClientState(**base)  # type: ignore[arg-type]


def test_round_trip() -> None:
    s = _state()
    assert decode(encode(s), backend=FP) == s
    assert s.key == "4242-123456"
    doc = json.loads(encode(s))
    assert doc["magic"] == "uffd-aio/serve-state" and doc["version"] == FORMAT_VERSION


def _resigned(doc: dict[str, object]) -> bytes:
    """A document with a valid checksum: the checks behind the checksum must hold too."""
    from uffd_aio.serve_state import _checksum

    doc = dict(doc)
    doc.pop("checksum", None)
    doc["checksum"] = _checksum(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("change", "message"), [
    ({"magic": "something-else"}, "not a uffd-aio serve state file"),
    ({"version": 99}, "version 99 is not the supported version"),
    ({"backend": "zero"}, "written for another backend or snapshot"),
    ({"key": "1-2"}, "does not match pid and start_time"),
    ({"pid": 0}, "field 'pid'"),
    ({"pid": True}, "field 'pid'"),
    ({"start_time": -1}, "field 'start_time'"),
    ({"fds": []}, "field 'fds'"),
    ({"fds": ["../../etc"]}, "field 'fds'"),
    ({"mappings": [{"base_host_virt_addr": 1, "size": 4096, "offset": 0,
                    "page_size": 4096}]}, "mappings: mapping 0"),
    ({"mappings": []}, "mappings: the mapping array is empty"),
    ({"removed": [[5, 1]]}, "field 'removed'"),
    ({"adopted_at": "now"}, "field 'adopted_at'"),
])
def test_invalid_fields_are_named(change: dict[str, object], message: str) -> None:
    doc = json.loads(encode(_state()))
    doc.update(change)
    with pytest.raises(StateError, match=message):
        decode(_resigned(doc), backend=FP)


def test_corruption_is_caught_by_the_checksum() -> None:
    data = bytearray(encode(_state()))
    i = data.index(b'"uid": 1000') + len(b'"uid": 1')
    data[i] = ord("1")  # uid 1100: still valid JSON, still a plausible uid
    with pytest.raises(StateError, match="checksum mismatch"):
        decode(bytes(data), backend=FP)
    with pytest.raises(StateError, match="not JSON"):
        decode(encode(_state())[:-20], backend=FP)  # a truncated file
    with pytest.raises(StateError, match="not UTF-8"):
        decode(b"\xff\xfe{}", backend=FP)
    with pytest.raises(StateError, match="expected a JSON object"):
        decode(b"[1, 2]", backend=FP)
    with pytest.raises(StateError, match="larger than any state file"):
        decode(b" " * (2 << 20), backend=FP)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_give_a_state_error_or_a_state(data: bytes) -> None:
    try:
        decode(data, backend=FP)
    except StateError:
        pass


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c,
                                                                         max_size=4),
                     max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["magic", "version", "backend", "key", "pid",
                                        "start_time", "uid", "gid", "fds", "mappings",
                                        "removed", "removes", "adopted_at", "generation"]),
                       _json))
def test_any_resigned_document_gives_a_state_error_or_a_state(change: dict[str, object]
                                                              ) -> None:
    doc = json.loads(encode(_state()))
    doc.update(change)
    try:
        data = _resigned(doc)
    except ValueError:  # NaN and the like: not representable, nothing to test
        return
    try:
        decode(data, backend=FP)
    except StateError:
        pass


def test_backend_fingerprint_follows_the_snapshot_file(tmp_path: Path) -> None:
    snap = tmp_path / "mem"
    snap.write_bytes(b"a" * 4096)
    fp = backend_fingerprint("file:x", str(snap))
    assert fp == backend_fingerprint("file:x", str(snap))
    snap.write_bytes(b"b" * 8192)  # modified in place
    assert backend_fingerprint("file:x", str(snap)) != fp
    assert backend_fingerprint("zero") == "zero"


def test_process_identity() -> None:
    me = process_start_time(os.getpid())
    assert me is not None and alive(os.getpid(), me)
    assert not alive(os.getpid(), me + 1)  # a recycled pid: another start time
    p = subprocess.Popen(["sleep", "30"])
    st_ = process_start_time(p.pid)
    p.kill()
    p.wait()
    assert st_ is not None and process_start_time(p.pid) is None


def test_write_atomic(tmp_path: Path) -> None:
    path = str(tmp_path / "s.json")
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert Path(path).read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["s.json"]  # no temp file left


# ---- systemd's fd store, with a fake NOTIFY_SOCKET --------------------------------------


def test_sd_notify_fdstore(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    r, w = os.pipe()
    try:
        store = fdkeeper.SystemdStore(env={"NOTIFY_SOCKET": path})
        store.put("4242-1", [r, w], 4242, 1)
        for i, fd in enumerate((r, w)):
            msg, anc, _, _ = srv.recvmsg(4096, socket.CMSG_SPACE(16))
            assert msg.decode() == f"FDSTORE=1\nFDNAME=4242-1.{i}\nFDPOLL=0"
            (level, kind, data), = anc
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            received = int.from_bytes(data[:4], sys.byteorder)
            assert os.path.samestat(os.fstat(received), os.fstat(fd))
            os.close(received)
        store.drop("4242-1")
        msgs = {srv.recv(4096).decode() for _ in range(4)}
        assert "FDSTOREREMOVE=1\nFDNAME=4242-1.0" in msgs
    finally:
        srv.close()
        os.close(r)
        os.close(w)


def test_sd_notify_abstract_socket() -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"uffd-aio-test-{os.getpid()}"
    srv.bind("\0" + name)
    try:
        assert fdkeeper.sd_notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert srv.recv(100) == b"READY=1"
    finally:
        srv.close()
    assert not fdkeeper.sd_notify("READY=1", env={})


def test_listen_fds() -> None:
    env = {"LISTEN_PID": "77", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a.0:a.1:b.0"}
    assert fdkeeper.listen_fds(env, 77) == [("a.0", 3), ("a.1", 4), ("b.0", 5)]
    assert fdkeeper.listen_fds(env, 78) == []  # for another process
    assert fdkeeper.listen_fds({"LISTEN_PID": "x"}, 77) == []


# ---- the fd keeper process ----------------------------------------------------------------


@contextlib.contextmanager
def _keeper(tmp_path: Path, idle: float = 0.5):  # type: ignore[no-untyped-def]
    store = fdkeeper.KeeperStore(str(tmp_path), idle=idle)
    try:
        yield store
    finally:
        store.close()
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((tmp_path / "fdkeeper.pid").read_text()), signal.SIGKILL)


def test_keeper_holds_and_returns_fds(tmp_path: Path) -> None:
    r, w = os.pipe()
    me = process_start_time(os.getpid())
    assert me is not None
    with _keeper(tmp_path) as store:
        assert store.started_keeper is not None
        store.put("k", [r, w], os.getpid(), me)
        os.close(r)
        os.close(w)
        assert store.names() == ["k"]
        fds = store.take("k")
        assert fds is not None and len(fds) == 2
        os.write(fds[1], b"x")
        assert os.read(fds[0], 1) == b"x"  # the same pipe, kept alive by the keeper
        fdkeeper.close_all(fds)
        assert store.take("k") is not None  # take leaves the keeper's copy
        again = fdkeeper.KeeperStore(str(tmp_path))  # a second server finds the same keeper
        assert again.started_keeper is None and again.names() == ["k"]
        again.close()
        store.drop("k")
        assert store.names() == [] and store.take("k") is None


def test_keeper_drops_fds_of_exited_processes_and_then_exits(tmp_path: Path) -> None:
    p = subprocess.Popen(["sleep", "30"])
    r, w = os.pipe()
    start = process_start_time(p.pid)
    assert start is not None
    with _keeper(tmp_path, idle=0.3) as store:
        store.put("child", [r], p.pid, start)
        store.put("recycled", [w], p.pid, start + 1)  # not that instance: dropped at once
        os.close(r)
        os.close(w)
        p.kill()
        p.wait()
        deadline = time.monotonic() + 20
        while store.names() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.names() == []
        pid = store.started_keeper
        assert pid is not None
        store.close()
        while time.monotonic() < deadline:  # no fds, no server: it exits
            if process_start_time(pid) is None:
                break
            time.sleep(0.1)
        assert process_start_time(pid) is None
        assert not (tmp_path / "fdkeeper.sock").exists()
