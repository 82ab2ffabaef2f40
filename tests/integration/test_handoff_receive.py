"""handoff.receive over real socket pairs, with a real uffd (no pager)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import struct
import termios
from collections.abc import Iterator

import attrs
import pytest

from tests.limits import limit
from uffd_aio.handoff import HandoffError, HandoffRejected, receive
from uffd_aio.uffd import Userfaultfd

PS = 4096
BASE = 0x7F00_0000_0000
GOOD = json.dumps([{"base_host_virt_addr": BASE, "size": 4 * PS, "offset": 0,
                    "page_size": PS, "page_size_kib": PS}]).encode()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


async def test_receive_one_uffd(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    uffd = Userfaultfd.open()
    try:
        socket.send_fds(client, [GOOD], [uffd.fd])
        h = await receive(server, timeout=2)
    finally:
        uffd.close()
    try:
        assert h.pid == os.getpid() and h.uid == os.getuid()
        assert h.mappings[0].base_host_virt_addr == BASE and h.total == 4 * PS
        assert os.readlink(f"/proc/self/fd/{h.uffd_fd}") == "anon_inode:[userfaultfd]"
    finally:
        h.close()


def unread(sock: socket.socket) -> int:
    """Bytes queued on ``sock`` that nobody has read yet."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


async def test_payload_split_over_several_sends(pair: tuple[socket.socket, socket.socket]
                                                ) -> None:
    server, client = pair
    uffd = Userfaultfd.open()
    try:
        socket.send_fds(client, [GOOD[:20]], [uffd.fd])
        task = asyncio.ensure_future(receive(server, timeout=10))
        async with asyncio.timeout(limit(10)):  # receive() has read the first part...
            while True:
                if unread(server) == 0 or task.done():
                    break
                await asyncio.sleep(0.01)
        assert not task.done(), task  # ...and waits for the rest
        client.send(GOOD[20:])
        h = await task
    finally:
        uffd.close()
    try:
        assert h.pid == os.getpid() and h.uid == os.getuid() and h.gid == os.getgid()
        assert [attrs.asdict(m) for m in h.mappings] == [
            {"base_host_virt_addr": BASE, "size": 4 * PS, "offset": 0, "page_size": PS}]
        assert os.readlink(f"/proc/self/fd/{h.uffd_fd}") == "anon_inode:[userfaultfd]"
    finally:
        h.close()


async def test_no_fd(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.send(GOOD)
    with pytest.raises(HandoffError, match="no file descriptor"):
        await receive(server, timeout=2)


async def test_several_fds_are_all_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    r, w = os.pipe()
    uffd = Userfaultfd.open()
    before = open_fds()
    try:
        socket.send_fds(client, [GOOD], [uffd.fd, r, w])
        with pytest.raises(HandoffError, match="3 file descriptors"):
            await receive(server, timeout=2)
        assert open_fds() == before
    finally:
        uffd.close()
        os.close(r)
        os.close(w)


async def test_not_a_uffd(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    r, w = os.pipe()
    before = open_fds()
    try:
        socket.send_fds(client, [GOOD], [r])
        with pytest.raises(HandoffError, match="not a userfaultfd"):
            await receive(server, timeout=2)
        assert open_fds() == before
    finally:
        os.close(r)
        os.close(w)


async def test_invalid_json_closes_the_fd(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    uffd = Userfaultfd.open()
    before = open_fds()
    try:
        socket.send_fds(client, [b"[{oops}]"], [uffd.fd])
        with pytest.raises(HandoffError, match="invalid JSON"):
            await receive(server, timeout=2)
        assert open_fds() == before
    finally:
        uffd.close()


async def test_eof_and_timeout(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    with pytest.raises(HandoffError, match="did not complete the handoff within"):
        await receive(server, timeout=0.1)
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(HandoffError, match="closed the connection"):
        await receive(server, timeout=2)


async def test_truncated_payload_then_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    uffd = Userfaultfd.open()
    try:
        socket.send_fds(client, [GOOD[:20]], [uffd.fd])
        client.shutdown(socket.SHUT_WR)
        with pytest.raises(HandoffError, match="in the middle of the mapping JSON"):
            await receive(server, timeout=2)
    finally:
        uffd.close()


async def test_payload_too_large(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    uffd = Userfaultfd.open()
    try:
        socket.send_fds(client, [b"[" + b" " * 300], [uffd.fd])
        with pytest.raises(HandoffError, match="more than 256 bytes"):
            await receive(server, timeout=2, max_payload=256)
    finally:
        uffd.close()


async def test_allow_uids(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _client = pair
    with pytest.raises(HandoffRejected, match="not allowed"):
        await receive(server, timeout=2, allow_uids={os.getuid() + 1})
