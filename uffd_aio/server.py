"""``uffd-aio serve``: a page server for uffds handed over a Unix socket (Firecracker's protocol).

:class:`HandoffServer` accepts any number of clients on one asyncio loop.
Per client:

1. :func:`uffd_aio.handoff.receive` reads the one handoff message (the uffd
   + the mapping JSON), checks the peer's uid against ``allow_uids`` first;
   bad input is logged (``uffd_aio.handoff_invalid``) and the connection
   closed, other clients never notice.  Until then the connection waits in a
   bounded pending queue (``max_pending``, the oldest dropped when full), not
   in one of the ``max_clients`` slots: idle connections cannot lock clients out.
2. The uffd goes to a :class:`~uffd_aio.pager.Pager` of its own (all pagers
   share one io_uring :class:`~uffd_aio.ring.Ring`); each mapping becomes a
   region (:meth:`Pager.adopt`) served from the backend through
   :func:`uffd_aio.handlers.attach.attach`: a fault at ``address`` reads
   the backend at ``offset + (address - base_host_virt_addr)``.
3. REMOVE events (balloon, MADV_DONTNEED) forget the range: the pages are
   fetched again when touched (``remove="zero"``: they read as zeros from
   then on, as Firecracker's example handler does).
4. Everything is released when the client's socket reaches EOF or the
   client process exits (a pidfd of the SO_PEERCRED pid), whichever comes
   first (``keep_after_eof``: only on process exit, for VMMs that close the
   socket right after the handoff).

See docs/handoff.md for the protocol, limits, security and failure behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import errno
import itertools
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, Literal

import attrs
import structlog

from uffd_aio.handlers.base import Backend
from uffd_aio.handoff import (
    Handoff,
    HandoffError,
    HandoffRejected,
    _readable,
    peer_credentials,
    receive,
)
from uffd_aio.handoff_proto import DEFAULT_MAX_MAPPINGS, DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_TOTAL
from uffd_aio.pager import ErrorPolicy, Pager
from uffd_aio.ring import Ring
from uffd_aio.uffd import Userfaultfd

RemovePolicy = Literal["refetch", "zero"]

__all__ = ["ClientInfo", "HandoffServer", "ServerStats", "add_arguments", "main"]


class _Ranges:
    """A set of disjoint [start, end) address ranges (balloon-removed memory)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self._starts)

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self._ends, start)  # first range that ends at/after start
        j = bisect.bisect_right(self._starts, end)  # ranges that start at/before end
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def __contains__(self, address: int) -> bool:
        i = bisect.bisect_right(self._starts, address) - 1
        return i >= 0 and address < self._ends[i]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))


@attrs.frozen
class ClientInfo:
    """What the server knows about one connected client (``server.clients``)."""

    id: int
    pid: int
    uid: int
    mappings: int
    bytes: int
    faults: int
    resolved_bytes: int
    removes: int
    since: float


@attrs.define(eq=False)
class ServerStats:
    """Counters of a :class:`HandoffServer` (totals since start)."""

    connections: int = 0
    served: int = 0
    rejected: int = 0
    invalid: int = 0
    failed: int = 0
    closed: int = 0
    faults: int = 0
    resolved_bytes: int = 0
    errors: int = 0
    #: bytes read from clients after their handoff (the protocol expects none)
    extra_bytes: int = 0


class _Client:
    def __init__(self, cid: int, sock: socket.socket, log: Any) -> None:
        self.id = cid
        self.sock = sock
        self.log = log
        self.pid = self.uid = -1
        self.task: asyncio.Task[None] | None = None
        self.handoff: Handoff | None = None
        self.pager: Pager | None = None
        self.attachments: list[Any] = []
        self.recorder: Any = None
        self.removed = _Ranges()
        self.removes = 0
        self.since = time.monotonic()
        self.stop_reason = ""

    def info(self) -> ClientInfo:
        st = self.pager.stats if self.pager is not None else None
        h = self.handoff
        return ClientInfo(self.id, self.pid, self.uid, len(h.mappings) if h else 0,
                          h.total if h else 0, st.faults if st else 0,
                          st.resolved_bytes if st else 0, self.removes, self.since)


async def _hangup(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Wait until the peer of socket ``fd`` closes (or shuts down writing) without reading:
    an epoll instance watching only EPOLLRDHUP (EPOLLHUP/EPOLLERR are implied) becomes
    readable then, however much unread data sits in the socket."""
    ep = select.epoll(1)
    try:
        ep.register(fd, select.EPOLLRDHUP)
        await _readable(loop, ep.fileno())
    finally:
        ep.close()


def _load_attach() -> Callable[..., Any] | None:
    try:
        from uffd_aio.handlers.attach import attach
    except ImportError:
        return None
    return attach


class HandoffServer:
    """Serve uffds handed over ``path`` from ``backend`` (see the module docstring).

    ``async with HandoffServer(path, backend) as server: await server.serve_forever()``.
    The backend is shared by all clients and closed with the server only if
    ``close_backend``.  ``attach_options`` go to
    :func:`uffd_aio.handlers.attach.attach` (e.g. ``readahead="adaptive"``);
    ``pager_options`` to each client's :class:`Pager`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        backend: Backend,
        *,
        allow_uids: Collection[int] | None = None,
        handoff_timeout: float = 5.0,
        max_mappings: int = DEFAULT_MAX_MAPPINGS,
        max_total: int = DEFAULT_MAX_TOTAL,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_clients: int = 1024,
        max_pending: int = 128,
        remove: RemovePolicy = "refetch",
        keep_after_eof: bool = False,
        on_error: ErrorPolicy = "poison",
        attach_options: dict[str, Any] | None = None,
        pager_options: dict[str, Any] | None = None,
        close_backend: bool = False,
        socket_mode: int = 0o600,
        record: str | os.PathLike[str] | None = None,
        replay: str | os.PathLike[str] | None = None,
    ) -> None:
        if remove not in ("refetch", "zero"):
            raise ValueError(f"remove must be 'refetch' or 'zero', not {remove!r}")
        if on_error not in ("poison", "zero"):
            raise ValueError("on_error must be 'poison' or 'zero' (one client's failure "
                             "must not stop the server)")
        self.path = os.fspath(path)
        self.backend = backend
        self.allow_uids = frozenset(allow_uids) if allow_uids is not None else None
        self.handoff_timeout = handoff_timeout
        self.max_mappings = max_mappings
        self.max_total = max_total
        self.max_payload = max_payload
        if max_clients < 1 or max_pending < 1:
            raise ValueError("max_clients and max_pending must be at least 1")
        self.max_clients = max_clients
        self.max_pending = max_pending
        self.remove = remove
        self.keep_after_eof = keep_after_eof
        self.on_error = on_error
        self.attach_options = dict(attach_options or {})
        self.pager_options = dict(pager_options or {})
        self.close_backend = close_backend
        self.socket_mode = socket_mode
        self.record = os.fspath(record) if record is not None else None
        self._replay: tuple[int, list[int]] | None = None
        if replay is not None:
            from uffd_aio.handlers.readahead import read_trace

            self._replay = read_trace(replay)
        self.stats = ServerStats()
        self._clients: dict[int, _Client] = {}  # handed off: each holds a client slot
        self._pending: dict[int, _Client] = {}  # connected, no handoff yet (oldest first)
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._lsock: socket.socket | None = None
        self._ring: Ring | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = asyncio.Event()
        self._changed = asyncio.Event()  # a client was adopted or released
        self._log = structlog.get_logger("uffd_aio").bind(component="server", socket=self.path)
        self._attach = _load_attach()
        if self._attach is None:
            self._log.warning("uffd_aio.attach_unavailable",
                              hint="uffd_aio.handlers.attach missing: serving one page per "
                                   "fault without read-ahead")

    # ---- lifecycle ----------------------------------------------------------

    async def __aenter__(self) -> HandoffServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind and listen (a stale socket file from a dead server is replaced)."""
        self._loop = asyncio.get_running_loop()
        self._remove_stale_socket()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o777 & ~self.socket_mode)
            try:
                lsock.bind(self.path)
            finally:
                os.umask(old)
            lsock.listen(128)
            lsock.setblocking(False)
        except BaseException:
            lsock.close()
            raise
        self._lsock = lsock
        self._ring = Ring(loop=self._loop)
        self._accept_task = self._loop.create_task(self._accept_loop())
        self._log.info("uffd_aio.server_listening", backend=self.backend.name,
                       allow_uids=sorted(self.allow_uids) if self.allow_uids else None,
                       remove=self.remove)

    def _remove_stale_socket(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)  # nobody listens: stale
            return
        finally:
            probe.close()
        raise FileExistsError(errno.EADDRINUSE, f"a server already listens on {self.path}")

    async def serve_forever(self) -> None:
        await self._closed.wait()

    async def aclose(self) -> None:
        """Stop accepting, release every client (their faults then go back to the
        kernel: memory still missing makes their threads fail), remove the socket."""
        if self._closed.is_set():
            return
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._lsock is not None:
            self._lsock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._ring is not None:
            self._ring.close()
        if self.close_backend:
            await self.backend.aclose()
        self._closed.set()
        self._log.info("uffd_aio.server_closed", **attrs.asdict(self.stats))

    # ---- introspection ----------------------------------------------------------

    @property
    def clients(self) -> list[ClientInfo]:
        return [c.info() for c in list(self._clients.values()) if c.pager is not None]

    @property
    def pending(self) -> int:
        """Connections that have not completed their handoff yet."""
        return len(self._pending)

    async def wait_clients(self, n: int, *, timeout: float = 10.0) -> None:
        """Wait until exactly ``n`` clients are being served (for tests)."""
        async with asyncio.timeout(timeout):
            while len(self.clients) != n:
                self._changed.clear()
                await self._changed.wait()

    # ---- accepting -----------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._lsock is not None
        lsock = self._lsock
        while True:
            try:
                conn, _ = await loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and the like: back off, keep serving the others
                self._log.error("uffd_aio.accept_failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            self.stats.connections += 1
            if len(self._pending) >= self.max_pending:
                self._evict_oldest_pending()
            cid = next(self._ids)
            client = _Client(cid, conn, self._log.bind(client=cid))
            self._pending[cid] = client
            task = loop.create_task(self._serve_client(client))
            client.task = task
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
            # let the new task read a handoff that is already there before the next accept:
            # a burst of real clients then never evicts one whose message is waiting
            await asyncio.sleep(0)

    def _evict_oldest_pending(self) -> None:
        """The pending queue is full: drop the connection that has waited longest.

        Idle connections must not lock real clients out (a real VMM sends its handoff
        right after connecting, so it is never the oldest for long)."""
        cid, oldest = next(iter(self._pending.items()))
        del self._pending[cid]
        self.stats.rejected += 1
        oldest.log.warning(
            "uffd_aio.handoff_rejected",
            error=f"peer pid {oldest.pid} had not completed its handoff after "
                  f"{time.monotonic() - oldest.since:.3f} s when {self.max_pending} "
                  "connections were pending (max_pending): dropped the oldest")
        if oldest.task is not None:
            oldest.task.cancel()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # never: _serve_client
            self._log.error("uffd_aio.client_task_failed",  # catches everything
                            error=repr(task.exception()), exc_info=task.exception())

    # ---- one client ----------------------------------------------------------------

    async def _serve_client(self, client: _Client) -> None:
        """One connection, start to end: every way it can end is logged and counted."""
        try:
            await self._serve_client_inner(client)
        except Exception as exc:  # a bug of ours: this client only, never the server
            self.stats.failed += 1
            client.log.error("uffd_aio.client_task_failed",
                             error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        finally:
            self._pending.pop(client.id, None)
            try:
                await self._release(client)
            except Exception as exc:
                client.log.error("uffd_aio.client_release_failed",
                                 error=f"{type(exc).__name__}: {exc}", exc_info=exc)

    async def _serve_client_inner(self, client: _Client) -> None:
        sock = client.sock
        try:
            client.pid, client.uid, _ = peer_credentials(sock)
        except OSError as exc:
            client.log.error("uffd_aio.handoff_invalid", error=f"SO_PEERCRED: {exc}")
            self.stats.invalid += 1
            return
        client.log = client.log.bind(peer_pid=client.pid, peer_uid=client.uid)
        client.log.info("uffd_aio.client_connected")
        try:
            h = await receive(sock, timeout=self.handoff_timeout,
                              max_payload=self.max_payload, max_mappings=self.max_mappings,
                              max_total=self.max_total, allow_uids=self.allow_uids)
        except HandoffRejected as exc:
            self.stats.rejected += 1
            client.log.error("uffd_aio.handoff_rejected", error=str(exc))
            return
        except HandoffError as exc:
            self.stats.invalid += 1
            client.log.error("uffd_aio.handoff_invalid", error=str(exc))
            return
        except OSError as exc:
            self.stats.invalid += 1
            client.log.error("uffd_aio.handoff_invalid", error=f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:  # receive() has a bug: still this client's bad luck only
            self.stats.invalid += 1
            client.log.error("uffd_aio.handoff_invalid",
                             error=f"unexpected {type(exc).__name__}: {exc}", exc_info=exc)
            return
        # no await from here to the client slot: an eviction cannot hit a served client
        if self._pending.pop(client.id, None) is None:
            h.close()  # evicted while receive() returned
            return
        if len(self._clients) >= self.max_clients:
            h.close()
            self.stats.rejected += 1
            client.log.error("uffd_aio.too_many_clients", limit=self.max_clients,
                             error=f"peer pid {client.pid} uid {client.uid} handed off "
                                   f"while {self.max_clients} clients were being served "
                                   "(max_clients): connection closed")
            return
        self._clients[client.id] = client
        client.handoff = h
        try:
            self._adopt(client, h)
        except Exception as exc:
            self.stats.failed += 1
            client.log.error("uffd_aio.client_setup_failed",
                             error=f"{type(exc).__name__}: {exc}")
            return
        self.stats.served += 1
        self._changed.set()
        client.log.info("uffd_aio.client_served", mappings=len(h.mappings), bytes=h.total,
                        regions=[f"{m.base_host_virt_addr:#x}+{m.size:#x}@{m.offset:#x}"
                                 for m in h.mappings[:8]])
        client.stop_reason = await self._wait_gone(client)

    def _adopt(self, client: _Client, h: Handoff) -> None:
        from uffd_aio import hugepages

        for i, m in enumerate(h.mappings):  # the peer's smaps: PageSizeMismatch names it
            hugepages.check_range(m.base_host_virt_addr, m.size, m.page_size, pid=h.pid,
                                  what=f"mapping {i}")
        uffd = Userfaultfd.from_fd(h.uffd_fd)
        opts: dict[str, Any] = {"close_timeout": 2.0, "on_error": self.on_error}
        opts.update(self.pager_options)
        pager = Pager(uffd=uffd, ring=self._ring, name=f"client{client.id}", **opts)
        try:
            pager.start()
        except BaseException:
            uffd.close()
            raise
        client.pager = pager
        pager.on_event(lambda msg: self._on_event(client, msg))
        if self.record is not None and self._attach is not None:
            from uffd_aio.handlers.readahead import FaultRecorder

            # one recorder for all the client's mappings: traces hold store pages
            client.recorder = FaultRecorder(None, page_size=h.mappings[0].page_size)
        for i, m in enumerate(h.mappings):
            region = pager.adopt(m.base_host_virt_addr, m.size, store_offset=m.offset,
                                 page_size=m.page_size, name=f"client{client.id}.map{i}")
            self._serve_region(client, region, m.offset)

    def _serve_region(self, client: _Client, region: Any, store_offset: int) -> None:
        backend = self.backend
        if self._attach is not None:
            opts = dict(self.attach_options)
            if client.recorder is not None:
                opts["recorder"] = client.recorder
            if self._replay is not None and self._replay[0] == region.page_size:
                opts["replay"] = self._replay[1]  # attach keeps the pages of this mapping
            client.attachments.append(
                self._attach(region, backend, store_offset=store_offset, **opts))
        else:
            async def fetch(ev: Any) -> Any:
                return await backend.fetch(store_offset + ev.offset, ev.page_size)

            region.on_fault(fetch)
        if self.remove == "zero":
            inner = region.fault_handler
            removed = client.removed

            def on_fault(ev: Any) -> Any:
                if removed and ev.page in removed:
                    return None  # a zero page: the client discarded this memory
                return inner(ev)

            region.fault_handler = on_fault

    def _on_event(self, client: _Client, msg: Any) -> None:
        from uffd_aio.events import Remove

        if isinstance(msg, Remove):
            client.removes += 1
            if self.remove == "zero":
                client.removed.add(msg.start, msg.end)
            client.log.debug("uffd_aio.client_remove", start=hex(msg.start), end=hex(msg.end))

    async def _wait_gone(self, client: _Client) -> str:
        """Wait for socket EOF or process exit; returns why the client is gone."""
        loop = asyncio.get_running_loop()
        waits: dict[asyncio.Future[Any], str] = {}
        pidfd = -1
        try:
            try:
                pidfd = os.pidfd_open(client.pid)
            except ProcessLookupError:
                return "process exited"
            except OSError as exc:  # no pidfd (old kernel, another pid namespace)
                client.log.warning("uffd_aio.no_pidfd", error=str(exc))
            if pidfd >= 0:
                waits[asyncio.ensure_future(_readable(loop, pidfd))] = "process exited"
            waits[asyncio.ensure_future(self._wait_eof(client, pidfd >= 0))] = \
                "connection closed"
            assert client.pager is not None
            waits[asyncio.ensure_future(client.pager.wait_closed())] = "pager closed"
            while True:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    reason = waits.pop(fut)
                    if not fut.cancelled() and fut.exception() is None:
                        # (an exception is retrieved: a PagerFailed is logged on release)
                        reason = fut.result() or reason
                    if reason == "connection closed" and self.keep_after_eof and pidfd >= 0:
                        client.log.info("uffd_aio.client_eof_kept")
                        continue
                    return reason
        finally:
            for fut in waits:
                fut.cancel()
            for fut in waits:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await fut
            if pidfd >= 0:
                os.close(pidfd)

    async def _wait_eof(self, client: _Client, watching_pid: bool) -> str | None:
        """Wait for the peer to close the connection.

        Nothing is expected after the handoff.  Data that arrives anyway is a protocol
        violation: it is read once (at most 4 KiB), logged, and the connection is never
        read again, so a client that keeps sending only fills its own socket buffer and
        then blocks, instead of making the loop read and discard its bytes at the
        expense of every other client.  From then on a hang-up is still noticed (an
        epoll of EPOLLRDHUP, which needs no read); without a pidfd the client is
        released instead (returns the reason)."""
        loop = asyncio.get_running_loop()
        sock = client.sock
        while True:
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                await _readable(loop, sock.fileno())
                continue
            except OSError:
                return None
            if not data:
                return None
            self.stats.extra_bytes += len(data)
            client.log.warning("uffd_aio.client_extra_data", bytes=len(data),
                               hint="nothing is expected after the handoff: this connection "
                                    "is not read any more")
            if not watching_pid:
                return "sent data after the handoff"
            await _hangup(loop, sock.fileno())
            return None

    async def _release(self, client: _Client) -> None:
        try:
            await self._release_pager(client)
        finally:
            self._clients.pop(client.id, None)
            self._changed.set()

    async def _release_pager(self, client: _Client) -> None:
        with contextlib.suppress(OSError):
            client.sock.close()
        pager = client.pager
        if pager is None:
            return
        for att in client.attachments:
            with contextlib.suppress(Exception):
                await att.aclose()
        if client.recorder is not None and len(client.recorder):
            self._save_trace(client)
        try:
            await pager.aclose()
        except Exception as exc:  # e.g. a PagerFailed: log, the server keeps going
            client.log.warning("uffd_aio.client_close_error",
                               error=f"{type(exc).__name__}: {exc}")
        st = pager.stats
        s = self.stats
        s.closed += 1
        s.faults += st.faults
        s.resolved_bytes += st.resolved_bytes
        s.errors += st.errors
        client.log.info("uffd_aio.client_released", reason=client.stop_reason or "server closing",
                        faults=st.faults, resolved_bytes=st.resolved_bytes, errors=st.errors,
                        removes=client.removes,
                        seconds=round(time.monotonic() - client.since, 3))


    def _save_trace(self, client: _Client) -> None:
        assert self.record is not None
        tmp = f"{self.record}.tmp{os.getpid()}"
        try:
            client.recorder.save(tmp)
            os.replace(tmp, self.record)  # readers never see half a trace
        except OSError as exc:
            client.log.error("uffd_aio.trace_save_failed", path=self.record, error=str(exc))
            return
        client.log.info("uffd_aio.trace_saved", path=self.record, pages=len(client.recorder))


# ---- Prometheus metrics (optional) ------------------------------------------------


def start_metrics(server: HandoffServer, port: int, addr: str = "127.0.0.1") -> bool:
    """Serve Prometheus metrics on ``addr:port``.

    Returns False (after a message on stderr) when prometheus-client is missing.
    """
    try:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    except ImportError:
        print("uffd-aio serve: --metrics-port needs prometheus-client "
              "(pip install 'uffd-aio[metrics]'); serving without metrics", file=sys.stderr)
        return False

    lock = threading.Lock()
    snap: dict[str, Any] = {"clients": [], "stats": ServerStats()}

    def refresh() -> None:  # on the loop thread; the HTTP thread only reads the snapshot
        with lock:
            snap["clients"] = server.clients
            snap["stats"] = attrs.evolve(server.stats)
        if server._loop is not None and not server._closed.is_set():
            server._loop.call_later(1.0, refresh)

    class Collector:
        def collect(self) -> Iterator[Any]:
            with lock:
                clients, st = list(snap["clients"]), snap["stats"]
            yield GaugeMetricFamily("uffd_aio_clients", "clients being served",
                                    value=len(clients))
            for name, help_ in (("connections", "connections accepted"),
                                ("served", "handoffs adopted"),
                                ("rejected", "peers refused (allow-uid, client limit, full queue)"),
                                ("invalid", "bad handoff messages"),
                                ("failed", "handoffs that could not be set up"),
                                ("closed", "clients released")):
                yield CounterMetricFamily(f"uffd_aio_{name}", help_, value=getattr(st, name))
            live_faults = sum(c.faults for c in clients)
            live_bytes = sum(c.resolved_bytes for c in clients)
            yield CounterMetricFamily("uffd_aio_faults", "page faults served",
                                      value=st.faults + live_faults)
            yield CounterMetricFamily("uffd_aio_resolved_bytes", "bytes resolved",
                                      value=st.resolved_bytes + live_bytes)
            g = GaugeMetricFamily("uffd_aio_client_faults", "faults per live client",
                                  labels=["client", "pid"])
            for c in clients:
                g.add_metric([str(c.id), str(c.pid)], c.faults)
            yield g

    registry = CollectorRegistry()  # our own: no process/platform noise, no global state
    registry.register(Collector())  # type: ignore[arg-type, unused-ignore]
    start_http_server(port, addr=addr, registry=registry)
    refresh()
    return True


# ---- the subcommand ---------------------------------------------------------------------

_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``64M``, ``1g``, ``2TiB`` -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _SUFFIX else ""
    try:
        value = int(t[: len(t) - len(unit)]) * _SUFFIX[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", required=True, metavar="PATH",
                        help="Unix socket to listen on (Firecracker's uffd socket path)")
    parser.add_argument("--backend", required=True, metavar="SPEC",
                        help="zero | file:PATH[?nowait] | compressed: | "
                             "redis://host:port/db?prefix=P")
    parser.add_argument("--allow-uid", type=int, action="append", metavar="UID",
                        help="accept only peers with this uid (repeatable; default: any)")
    parser.add_argument("--metrics-port", type=int, metavar="N",
                        help="serve Prometheus metrics on 127.0.0.1:N (needs prometheus-client)")
    parser.add_argument("--readahead", metavar="POLICY",
                        help="read-ahead: off, N pages, fixed:N, adaptive, adaptive:MAX")
    parser.add_argument("--record", metavar="FILE",
                        help="record the order of each client's first faults to FILE "
                             "(rewritten whenever a client is released: record one VM)")
    parser.add_argument("--replay", metavar="FILE",
                        help="prefetch every client's pages in the order FILE recorded, in "
                             "the background (real faults go first)")
    parser.add_argument("--remove", choices=["refetch", "zero"], default="refetch",
                        help="after REMOVE (balloon/MADV_DONTNEED): fetch the pages again "
                             "(default) or serve zeros")
    parser.add_argument("--keep-after-eof", action="store_true",
                        help="keep serving a client whose socket closed until its process "
                             "exits (VMMs that close the socket after the handoff)")
    parser.add_argument("--max-mappings", type=int, default=DEFAULT_MAX_MAPPINGS,
                        help=f"mappings per client ({DEFAULT_MAX_MAPPINGS})")
    parser.add_argument("--max-total", type=parse_size, default=DEFAULT_MAX_TOTAL,
                        metavar="BYTES", help="memory per client (1T)")
    parser.add_argument("--max-clients", type=int, default=1024,
                        help="clients served at once (1024); only completed handoffs count")
    parser.add_argument("--max-pending", type=int, default=128,
                        help="connections that have not completed their handoff yet (128); "
                             "when full, the one waiting longest is dropped")
    parser.add_argument("--handoff-timeout", type=float, default=5.0, metavar="S",
                        help="seconds a client has to send its handoff (5)")
    parser.add_argument("--on-error", choices=["poison", "zero"], default="poison",
                        help="a failed fetch: SIGBUS in the faulting thread (default) or a "
                             "zero page")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")


async def _serve(args: argparse.Namespace) -> int:
    from uffd_aio.handlers import open_backend

    try:
        backend = await open_backend(args.backend)
    except Exception as exc:
        print(f"uffd-aio serve: cannot open backend {args.backend!r}: {exc}", file=sys.stderr)
        return 2
    attach_options: dict[str, Any] = {}
    if args.readahead is not None:
        attach_options["readahead"] = (int(args.readahead) if args.readahead.isdigit()
                                       else args.readahead)
    try:
        if "readahead" in attach_options:
            from uffd_aio.handlers.readahead import policy_from

            policy_from(attach_options["readahead"])  # a bad spec fails now, not per client
        server = HandoffServer(args.socket, backend, allow_uids=args.allow_uid,
                               handoff_timeout=args.handoff_timeout,
                               max_mappings=args.max_mappings, max_total=args.max_total,
                               max_clients=args.max_clients, max_pending=args.max_pending,
                               remove=args.remove,
                               keep_after_eof=args.keep_after_eof, on_error=args.on_error,
                               attach_options=attach_options, close_backend=True,
                               record=args.record, replay=args.replay)
    except (OSError, ValueError) as exc:
        await backend.aclose()
        print(f"uffd-aio serve: {exc}", file=sys.stderr)
        return 2
    try:
        await server.start()
    except OSError as exc:
        await backend.aclose()
        print(f"uffd-aio serve: cannot listen on {args.socket}: {exc}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    closing: list[asyncio.Task[None]] = []  # a reference keeps the task alive
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: closing.append(loop.create_task(server.aclose())))
    if args.metrics_port is not None:
        start_metrics(server, args.metrics_port)
    print(f"uffd-aio serve: listening on {args.socket}, backend {backend.name}",
          file=sys.stderr, flush=True)
    await server.serve_forever()
    return 0


def main(args: argparse.Namespace) -> int:
    if args.loop == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_serve(args))
