"""Receive a userfaultfd handed over a Unix socket (Firecracker's protocol).

The peer sends one message: the uffd as SCM_RIGHTS ancillary data and a
JSON array of mappings as payload (see :mod:`uffd_aio.handoff_proto` for
the format and validation).  :func:`receive` reads it on the running loop
(no threads), checks it, and returns a :class:`Handoff` whose ``uffd_fd``
the caller now owns.  On any error every fd that arrived is closed and
:class:`HandoffError` says what was wrong; the caller closes the connection.

The peer's pid/uid/gid come from SO_PEERCRED (the kernel's record of who
connected, not anything the peer claims).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Collection

import attrs

from uffd_aio.fdkeeper import close_all, fds_of
from uffd_aio.handoff_proto import (
    DEFAULT_MAX_MAPPINGS,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_MAX_TOTAL,
    HandoffError,
    Mapping,
    parse_mappings,
    payload_incomplete,
)

__all__ = ["Handoff", "HandoffError", "HandoffRejected", "Mapping", "peer_credentials",
           "receive", "wait_readable"]

#: fds we make room for in one message: enough to see (and close) a few extra ones
_MAX_FDS = 16
_UCRED = struct.Struct("3i")


class HandoffRejected(HandoffError):
    """The peer is not allowed to hand over memory (``allow_uids``)."""


@attrs.frozen
class Handoff:
    """A received uffd and the memory it covers in process ``pid``.

    ``uffd_fd`` belongs to the caller (close it, or give it to a Pager).
    """

    uffd_fd: int
    mappings: tuple[Mapping, ...]
    pid: int
    uid: int
    gid: int

    @property
    def total(self) -> int:
        return sum(m.size for m in self.mappings)

    def close(self) -> None:
        try:
            os.close(self.uffd_fd)
        except OSError:
            pass


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected ``sock`` (SO_PEERCRED)."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


async def wait_readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Return when ``fd`` is readable (``loop.add_reader`` for one wakeup)."""
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def _recvmsg(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int
                   ) -> tuple[bytes, list[int], int]:
    anc = socket.CMSG_SPACE(_MAX_FDS * 4)
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(size, anc, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            await wait_readable(loop, sock.fileno())
            continue
        return data, fds_of(ancdata), flags


def is_uffd(fd: int) -> bool:
    """Whether ``fd`` (of this process) is a userfaultfd."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False


async def receive(
    sock: socket.socket,
    *,
    timeout: float = 5.0,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    max_mappings: int = DEFAULT_MAX_MAPPINGS,
    max_total: int = DEFAULT_MAX_TOTAL,
    allow_uids: Collection[int] | None = None,
) -> Handoff:
    """Receive one handoff from a connected Unix stream socket.

    The fd must come with the first message, exactly one of it, and it must
    be a userfaultfd.  A payload that a stream split over several reads is
    read to its end (within ``max_payload`` bytes and ``timeout`` seconds);
    later chunks must not carry fds.  ``allow_uids``: reject other peers
    before reading anything (:class:`HandoffRejected`).
    """
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    pid, uid, gid = peer_credentials(sock)
    who = f"peer pid {pid} uid {uid}"
    if allow_uids is not None and uid not in allow_uids:
        raise HandoffRejected(f"{who} is not allowed (--allow-uid {sorted(allow_uids)})")
    fds: list[int] = []
    try:
        async with asyncio.timeout(timeout):
            data, fds, flags = await _recvmsg(loop, sock, max_payload + 1)
            if flags & socket.MSG_CTRUNC:
                raise HandoffError(f"{who} sent more than {_MAX_FDS} file descriptors")
            if not data and not fds:
                raise HandoffError(f"{who} closed the connection without sending a handoff")
            if not fds:
                raise HandoffError(f"{who} sent no file descriptor (expected the uffd "
                                   "as SCM_RIGHTS with the mapping JSON)")
            if len(fds) > 1:
                raise HandoffError(f"{who} sent {len(fds)} file descriptors, expected "
                                   "exactly one (the uffd)")
            if not is_uffd(fds[0]):
                raise HandoffError(f"{who} sent a file descriptor that is not a userfaultfd")
            payload = bytearray(data)
            while payload_incomplete(payload) and len(payload) <= max_payload:
                more, extra, _ = await _recvmsg(loop, sock, max_payload + 1 - len(payload))
                if extra:
                    close_all(extra)
                    raise HandoffError(f"{who} sent file descriptors after the first message")
                if not more:
                    raise HandoffError(f"{who} closed the connection in the middle of the "
                                       f"mapping JSON ({len(payload)} bytes received)")
                payload += more
            if len(payload) > max_payload:
                raise HandoffError(f"{who} sent more than {max_payload} bytes of mapping JSON")
            mappings = parse_mappings(bytes(payload), max_mappings=max_mappings,
                                      max_total=max_total)
    except TimeoutError:
        close_all(fds)
        raise HandoffError(f"{who} did not complete the handoff within {timeout} s") from None
    except BaseException:
        close_all(fds)
        raise
    return Handoff(fds[0], mappings, pid, uid, gid)
