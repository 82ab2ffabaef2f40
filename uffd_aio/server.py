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
   :func:`uffd_aio.serving.attach.attach`: a fault at ``address`` reads
   the backend at ``offset + (address - base_host_virt_addr)``.  With a
   ``file:`` or ``zero`` backend the region is served by the native engine
   instead (:meth:`Region.serve_from`: faults resolved in C; ``record`` and
   ``record_set`` are fed from the engine's first-touch log), unless an option
   needs Python on every fault (``dirty``, ``remove="zero"`` on a file, a
   mapping past the end of the file, huge pages, ``native=False``): see
   :meth:`HandoffServer._native_plan`.
3. REMOVE events (balloon, MADV_DONTNEED) forget the range: the pages are
   fetched again when touched (``remove="zero"``: they read as zeros from
   then on, as Firecracker's example handler does).
4. Everything is released when the client's socket reaches EOF or the
   client process exits (a pidfd of the SO_PEERCRED pid), whichever comes
   first (``keep_after_eof``: only on process exit, for VMMs that close the
   socket right after the handoff).

Its options arrive as one frozen :class:`~uffd_aio.serve_options.ServeOptions`
(the keywords of ``HandoffServer(...)`` are converted once, at construction);
the ``uffd-aio serve`` command is :mod:`uffd_aio.serve_cli`.

See docs/handoff.md for the protocol, limits, security and failure behaviour.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import fcntl
import itertools
import os
import select
import signal
import socket
import stat
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import TYPE_CHECKING

import attrs

from uffd_aio import workingset
from uffd_aio.fdkeeper import (
    FdStore,
    KeeperStore,
    StoreError,
    SystemdStore,
    close_all,
    recv_msg,
    send_msg,
)
from uffd_aio.handoff import (
    Handoff,
    HandoffError,
    HandoffRejected,
    is_uffd,
    peer_credentials,
    receive,
    wait_readable,
)
from uffd_aio.handoff_proto import DEFAULT_MAX_MAPPINGS, DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_TOTAL
from uffd_aio.log import get_logger
from uffd_aio.native import ZERO as _ZERO
from uffd_aio.native import readahead_bounds
from uffd_aio.pager import Pager
from uffd_aio.ring import Ring
from uffd_aio.ring.ring import REDRAIN_ROUNDS as _REDRAIN_DEFAULT
from uffd_aio.serve_options import (
    AttachOptions,
    FatalPolicy,
    FdStoreChoice,
    PagerOptions,
    ReadaheadSpec,
    RemovePolicy,
    ServeErrorPolicy,
    ServeOptions,
    add_arguments,
    pager_options_from,
    parse_size,
)
from uffd_aio.serve_state import (
    MAX_STATE_BYTES,
    ClientState,
    StateError,
    alive,
    backend_fingerprint,
    client_key,
    decode,
    encode,
    process_start_time,
    write_atomic,
)
from uffd_aio.serving.attach import Attachment, attach
from uffd_aio.serving.readahead import AdaptiveWindow, FaultRecorder, FixedWindow, NoReadahead
from uffd_aio.stats import PagerStats
from uffd_aio.stores.base import PageStore
from uffd_aio.stores.file import FileBackend
from uffd_aio.uffd import Userfaultfd
from uffd_aio.workingset import WorkingSet, WorkingSetRecorder

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from uffd_aio.events import Fork, Remap, Remove, Unmap
    from uffd_aio.region import Region
    from uffd_aio.serving.setreplay import SetInstaller

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

__all__ = ["AttachOptions", "ClientInfo", "HandoffServer", "ReadaheadSpec", "RecoveryReport",
           "ServeOptions", "ServerStats", "add_arguments", "parse_size"]


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

    def __contains__(self, address: object) -> bool:
        if not self._starts or not isinstance(address, int):
            return False
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
    #: faults resolved by the native engine / seen by Python (``faults`` is their sum)
    native_faults: int = 0
    python_faults: int = 0
    #: how its regions are served: "native", "python" or "mixed"
    path: str = "python"


@attrs.define(eq=False)
class RecoveryReport:
    """What a server found in its state directory (or got from a takeover) at start."""

    how: str = "state"  # "state" (restart) or "takeover"
    adopted: int = 0
    dropped: int = 0  # clients that exited meanwhile: state and fds removed
    rejected: int = 0  # corrupt/foreign state files (moved to STATE_DIR/rejected/)
    lost: int = 0  # alive, but no fd could be had: cannot be served again
    seconds: float = 0.0


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
    #: of ``faults``: resolved in C by the native engine / seen by Python
    native_faults: int = 0
    python_faults: int = 0
    #: regions served by the native engine / by Python (since start)
    native_regions: int = 0
    python_regions: int = 0
    #: bytes read from clients after their handoff (the protocol expects none)
    extra_bytes: int = 0
    #: working-set replay: pages installed from the set / by the fill, replays finished
    ws_pages_by_replay: int = 0
    ws_pages_by_fill: int = 0
    #: ... of which read with io_uring (not in the page cache: a cold snapshot)
    ws_pages_read: int = 0
    ws_installed: int = 0


class _Client:
    def __init__(self, cid: int, sock: socket.socket | None, log: FilteringBoundLogger
                 ) -> None:
        self.id = cid
        self.sock = sock
        self.log = log
        self.pid = self.uid = self.gid = -1
        #: the process instance (field 22 of /proc/PID/stat): a recycled pid has another
        self.start_time: int | None = None
        self.pidfd = -1
        #: --state-dir: our own copy of the uffd (the pager owns the other), for a takeover
        self.keep_uffd = -1
        self.stored = False  # its fds are in the fd store / its state file is written
        self.detached = False  # handed to another server (or left for the next one)
        self.state_generation = 0
        self.state_flush: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.handoff: Handoff | None = None
        self.pager: Pager | None = None
        self.attachments: list[Attachment] = []
        self.recorder: FaultRecorder | None = None  # --record
        self.ws_recorder: WorkingSetRecorder | None = None  # --record-set
        self.installer: SetInstaller | None = None  # working-set replay
        self.install_task: asyncio.Task[None] | None = None
        self.removed = _Ranges()
        self.removes = 0
        self.native_regions = 0
        self.python_regions = 0
        self.since = time.monotonic()
        self.stop_reason = ""

    @property
    def key(self) -> str:
        assert self.start_time is not None
        return client_key(self.pid, self.start_time)

    def close_kept(self) -> None:
        """Close what was kept for a takeover: our uffd copy and the connection."""
        if self.keep_uffd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.keep_uffd)
            self.keep_uffd = -1
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()

    def info(self) -> ClientInfo:
        st = self.pager.stats if self.pager is not None else None
        h = self.handoff
        return ClientInfo(self.id, self.pid, self.uid, len(h.mappings) if h else 0,
                          h.total if h else 0, st.faults if st else 0,
                          _resolved_bytes(st) if st else 0, self.removes, self.since,
                          st.native_faults if st else 0, st.python_faults if st else 0,
                          self.path)

    @property
    def path(self) -> str:
        if self.native_regions and self.python_regions:
            return "mixed"
        return "native" if self.native_regions else "python"


def _resolved_bytes(st: PagerStats) -> int:
    """Bytes placed for a client: Python's resolutions and the engine's pages (base
    pages only; read-ahead included on both sides)."""
    return int(st.resolved_bytes) + int(st.native_pages) * _PAGE_SIZE


async def _hangup(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Wait until the peer of socket ``fd`` closes (or shuts down writing) without reading:
    an epoll instance watching only EPOLLRDHUP (EPOLLHUP/EPOLLERR are implied) becomes
    readable then, however much unread data sits in the socket."""
    ep = select.epoll(1)
    try:
        ep.register(fd, select.EPOLLRDHUP)
        await wait_readable(loop, ep.fileno())
    finally:
        ep.close()


class HandoffServer:
    """Serve uffds handed over ``path`` from ``backend`` (see the module docstring).

    ``async with HandoffServer(path, backend) as server: await server.serve_forever()``.
    The backend is shared by all clients and closed with the server only if
    ``close_backend``.  ``attach_options`` go to
    :func:`uffd_aio.serving.attach.attach` (e.g. ``readahead="adaptive"``);
    ``pager_options`` to each client's :class:`Pager`.  ``native`` (default True):
    serve ``file:``/``zero`` backends with the native engine where no option needs
    Python (False: always the Python path, e.g. to compare).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        backend: PageStore,
        *,
        options: ServeOptions | None = None,
        allow_uids: Collection[int] | None = None,
        handoff_timeout: float = 5.0,
        max_mappings: int = DEFAULT_MAX_MAPPINGS,
        max_total: int = DEFAULT_MAX_TOTAL,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_clients: int = 1024,
        max_pending: int = 128,
        remove: RemovePolicy = "refetch",
        keep_after_eof: bool = False,
        on_error: ServeErrorPolicy = "poison",
        attach_options: AttachOptions | Mapping[str, object] | None = None,
        pager_options: Mapping[str, object] | None = None,
        close_backend: bool = False,
        socket_mode: int = 0o600,
        record: str | os.PathLike[str] | None = None,
        replay: str | os.PathLike[str] | None = None,
        record_set: str | os.PathLike[str] | None = None,
        record_set_pages: int | None = None,
        record_set_seconds: float | None = None,
        fill: bool = False,
        snapshot_id: str | None = None,
        replay_chunk: int = 1024,
        state_dir: str | os.PathLike[str] | None = None,
        takeover: bool = False,
        on_fatal: FatalPolicy = "hang",
        fd_store: FdStoreChoice = "auto",
        keeper_idle: float = 30.0,
        pidfd_getfd: bool = False,
        takeover_drain: float = 1.0,
        native: bool = True,
    ) -> None:
        # the keywords become one record here (ValueError for a bad value); or the
        # record comes made (ServeOptions.from_args), and then no keyword may be given
        opts = ServeOptions(
            allow_uids=allow_uids, handoff_timeout=handoff_timeout,
            max_mappings=max_mappings, max_total=max_total, max_payload=max_payload,
            max_clients=max_clients, max_pending=max_pending, remove=remove,
            keep_after_eof=keep_after_eof, on_error=on_error,
            attach=AttachOptions.from_mapping(attach_options),
            pager=pager_options_from(pager_options), socket_mode=socket_mode,
            record=record, replay=replay, record_set=record_set,
            record_set_pages=record_set_pages, record_set_seconds=record_set_seconds,
            fill=fill, snapshot_id=snapshot_id, replay_chunk=replay_chunk,
            state_dir=state_dir, takeover=takeover, on_fatal=on_fatal, fd_store=fd_store,
            keeper_idle=keeper_idle, pidfd_getfd=pidfd_getfd, takeover_drain=takeover_drain,
            native=native)
        if options is not None:
            if opts != ServeOptions():
                raise TypeError("HandoffServer: pass options= or the option keywords, "
                                "not both")
            opts = options
        self.options = opts
        self.path = os.fspath(path)
        self.backend = backend
        self.close_backend = close_backend
        self._native_window = self._native_readahead()
        self._replay: tuple[int, list[int]] | None = None
        self._ws: WorkingSet | None = None  # to install (--replay of a working-set file)
        self._src_map: tuple[int, int] | None = None  # (address, length) of the snapshot
        #: the snapshot file, open: what the installer reads with io_uring when the mapping's
        #: pages are not in the page cache
        self._src_fd: int | None = None
        self._installing = 0  # clients whose working set is going in (set phase)
        if opts.replay is not None:
            from uffd_aio.serving.readahead import decode_trace

            with open(opts.replay, "rb") as f:
                data = f.read()
            if workingset.is_working_set(data):
                self._ws = workingset.decode(data, what=f"working set {opts.replay!r}")
                self._check_ws(self._ws)
            else:
                try:
                    self._replay = decode_trace(data)
                except ValueError as exc:
                    raise ValueError(f"--replay {opts.replay!r} is neither a working "
                                     f"set nor a fault trace: {exc}") from None
        if opts.fill and self._ws is None:
            raise ValueError("fill needs a working set to replay (--replay FILE of "
                             "`uffd-aio workingset` format)")
        if self._ws is not None and opts.attach.dirty is not None:
            raise ValueError("working-set record/replay does not support dirty tracking")
        #: set when the server handed its clients over (or left them for the next one)
        self.handed_over = False
        self._store: FdStore | None = None
        self._lock_fd = -1
        self._tsock: socket.socket | None = None  # takeover listener (state dir)
        self._takeover_task: asyncio.Task[None] | None = None
        self._fingerprint = ""
        self.recovery: RecoveryReport | None = None
        self._detached_clients: list[_Client] = []
        self._closing_task: asyncio.Task[None] | None = None
        self._defer_store = False  # during a takeover: store + write after the WAKEs
        self._fatal: asyncio.Future[BaseException] | None = None
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
        self._log = get_logger(component="server", socket=self.path)

    # ---- lifecycle ----------------------------------------------------------

    async def __aenter__(self) -> HandoffServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind and listen (a stale socket file from a dead server is replaced).

        With ``state_dir``: take the directory's lock, then serve again every client
        a previous server left there (a crash or a restart), or, with ``takeover``,
        receive every client of the running server (its listening socket too)."""
        self._loop = asyncio.get_running_loop()
        received: _Received | None = None
        if self.options.state_dir is not None:
            self._fingerprint = self._backend_fingerprint()
            os.makedirs(os.path.join(self.options.state_dir, "clients"), mode=0o700, exist_ok=True)
            if self.options.takeover:
                received = await self._request_takeover()
                self._lsock = received.lsock
            else:
                self._lock(wait=0)
        try:
            if self._lsock is None:
                self._bind()
            self._ring = Ring.shared(self._loop)  # one io_uring per loop: shared with the stores
            if self.options.state_dir is not None:
                self._store = self._open_store()
                if received is not None:
                    await self._adopt_received(received)
                else:
                    self._recover()
                self._listen_takeover()
        except BaseException:
            if received is not None:
                received.close()
            self._abort_start()
            raise
        self._accept_task = self._loop.create_task(self._accept_loop())
        self._accept_task.add_done_callback(self._accept_done)
        uids = self.options.allow_uids
        self._log.info("uffd_aio.server_listening", backend=self.backend.name,
                       allow_uids=sorted(uids) if uids else None,
                       remove=self.options.remove, state_dir=self.options.state_dir,
                       fd_store=self._store.kind if self._store is not None else None)

    # ---- working sets (--record-set, --replay of a set, --fill) ----------------------

    def _snapshot_identity(self, page_size: int) -> tuple[int | None, bytes]:
        """(store pages, snapshot id) of the backend, as far as it can tell: a file's
        size and content fingerprint; a caller-given ``snapshot_id`` wins for the id."""
        from uffd_aio import workingset
        from uffd_aio.stores.file import FileBackend

        backend = self.backend
        pages: int | None = None
        sid = workingset.NO_ID
        if isinstance(backend, FileBackend):
            pages = (backend.size + page_size - 1) // page_size
            if os.path.isfile(backend.path):
                sid = workingset.fingerprint_file(backend.path)
        if self.options.snapshot_id is not None:
            sid = workingset.id_from_text(self.options.snapshot_id)
        return pages, sid

    def _check_ws(self, ws: WorkingSet) -> None:
        pages, sid = self._snapshot_identity(ws.page_size)
        ws.check(page_size=ws.page_size, store_pages=pages, snapshot_id=sid,
                 what="the working set")

    def _source_map(self) -> int | None:
        """Address of store offset 0 in a read-only mapping of the snapshot file (made
        once, shared by every client), or None when the backend is not a file."""
        from uffd_aio.binding import lowlevel as ll
        from uffd_aio.stores.file import FileBackend

        backend = self.backend
        if not isinstance(backend, FileBackend) or not os.path.isfile(backend.path) \
                or backend.size == 0:
            return None
        if self._src_map is None:
            fd = os.open(backend.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                addr = ll.mmap(backend.size, prot=ll.PROT_READ, flags=ll.MAP_SHARED, fd=fd)
            except BaseException:
                os.close(fd)
                raise
            self._src_map = (addr, backend.size)
            self._src_fd = fd
        return self._src_map[0]

    def _start_install(self, client: _Client, h: Handoff) -> None:
        """Install the working set (then the rest with ``fill``) into the client's
        mappings in the background: real faults keep priority (setreplay)."""
        from uffd_aio import workingset
        from uffd_aio.serving.setreplay import SetInstaller, Target
        from uffd_aio.stores.file import FileBackend

        ws = self._ws
        pager = client.pager
        assert pager is not None and ws is not None
        ps = h.mappings[0].page_size
        try:
            if any(m.page_size != ws.page_size for m in h.mappings):
                raise workingset.WorkingSetMismatch(
                    f"the working set has page size {ws.page_size}, the client's mappings "
                    f"{sorted({m.page_size for m in h.mappings})}")
            if not isinstance(self.backend, FileBackend):
                extent = max(m.offset + m.size for m in h.mappings) // ps
                ws.check(page_size=ps, store_pages=extent, what="the working set")
        except workingset.WorkingSetMismatch as exc:
            client.log.error("uffd_aio.workingset_rejected", error=str(exc))
            return
        targets: list[Target] = []
        for region in pager.regions:
            lo = region.store_offset // ps
            removed = None
            if self.options.remove == "zero":
                rm = client.removed
                base = region.address - region.store_offset

                def removed(page: int, rm: _Ranges = rm, base: int = base) -> bool:
                    return bool(rm) and base + page * ps in rm
            targets.append(Target(lo, lo + region.length // ps, region.address,
                                  pager.uffd_for(region).fd, removed=removed))
        chunk = self.options.replay_chunk
        plan = workingset.InstallPlan(ws, [(t.lo, t.hi) for t in targets],
                                      fill=self.options.fill, chunk=chunk, max_run=chunk)
        src = self._source_map()
        reads = pager.native_reads
        ring = self._ring
        assert ring is not None

        def set_phase(on: bool) -> None:
            # While the set goes in, each of the installer's yields serves the faults
            # waiting then, but neither the engine (native_reads 0, this client) nor
            # the ring (one reap/submit round instead of 32, while any client installs
            # a set) keeps polling for the faults that follow: a client that does
            # nothing but touch pages would otherwise keep the loop in fault serving,
            # each fault costing several times the copy of its page.  A fault still
            # waits at most one batch.  Restored for the fill and after.
            pager.native_reads = 0 if on else reads
            self._installing += 1 if on else -1
            ring.redrain_rounds = 1 if self._installing else _REDRAIN_DEFAULT

        inst = SetInstaller(plan, targets, page_size=ps, src_base=src,
                            backend=None if src is not None else self.backend,
                            # pages not in the page cache: io_uring READs on the loop's ring
                            ring=ring if src is not None else None,
                            src_fd=self._src_fd if src is not None else None,
                            faults=lambda: pager.stats.faults, log=client.log,
                            set_phase=set_phase)
        client.installer = inst
        assert self._loop is not None
        task = self._loop.create_task(self._run_install(client, inst))
        client.install_task = task

    async def _run_install(self, client: _Client, inst: SetInstaller) -> None:
        client.log.info("uffd_aio.workingset_replay_started", set_pages=inst.plan.set_pages,
                        fill=self.options.fill, fill_pages=inst.plan.fill_pages)
        try:
            m = await inst.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a backend failure: faults still serve it all
            client.log.error("uffd_aio.workingset_replay_failed",
                             error=f"{type(exc).__name__}: {exc}")
            return
        if inst.closed:
            return
        pager = client.pager
        self.stats.ws_pages_by_replay += m.pages_by_replay
        self.stats.ws_pages_by_fill += m.pages_by_fill
        self.stats.ws_pages_read += m.pages_read
        self.stats.ws_installed += 1
        client.log.info("uffd_aio.workingset_installed", **m.as_dict(),
                        demand_faults=pager.stats.faults if pager is not None else 0)

    async def _stop_install(self, client: _Client) -> None:
        if client.installer is not None:
            client.installer.close()
        task = client.install_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def workingset_metrics(self, client_id: int) -> dict[str, object] | None:
        """The replay metrics of a connected client (None without a replay)."""
        c = self._clients.get(client_id)
        inst = getattr(c, "installer", None)
        if c is None or inst is None:
            return None
        out = inst.metrics.as_dict()
        out["done"] = c.install_task is not None and c.install_task.done()
        out["demand_faults"] = c.pager.stats.faults if c.pager is not None else 0
        return dict(out)

    def _save_set(self, client: _Client) -> None:
        from uffd_aio import workingset

        assert self.options.record_set is not None
        rec = client.ws_recorder
        assert rec is not None
        try:
            workingset.write(self.options.record_set, rec.result())
        except OSError as exc:
            client.log.error("uffd_aio.workingset_save_failed", path=self.options.record_set,
                             error=str(exc))
            return
        client.log.info("uffd_aio.workingset_saved", path=self.options.record_set, pages=len(rec),
                        written=len(rec.written), full=rec.full)

    def _backend_fingerprint(self) -> str:
        path = getattr(self.backend, "path", None)
        if isinstance(path, str | os.PathLike) and os.path.isfile(path):
            return backend_fingerprint(self.backend.name, os.fspath(path))
        return backend_fingerprint(self.backend.name)

    def _bind(self) -> None:
        self._remove_stale_socket()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o777 & ~self.options.socket_mode)
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

    def _abort_start(self) -> None:
        for c in list(self._clients.values()):
            c.detached = True  # a failed start leaves the state for the next server
            if c.task is not None:
                c.task.cancel()
        if self._lsock is not None and not self.options.takeover:
            self._lsock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self._ring is not None and not self._clients:
            self._ring.close()
        if self._store is not None:
            self._store.close()
        self._unlock()

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
        """Serve until closed; a fatal failure of the server (see :meth:`fatal`) is raised."""
        loop = asyncio.get_running_loop()
        if self._fatal is None:
            self._fatal = loop.create_future()
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait((closed, self._fatal), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if self._fatal.done() and not self._closed.is_set():
            raise self._fatal.result()

    def fatal(self, exc: BaseException) -> None:
        """The server cannot go on (a bug, a dead ring): ``on_fatal="kill-clients"``
        SIGKILLs every client now (a VM killed loudly beats one hung forever, as
        Firecracker recommends); :meth:`serve_forever` then raises ``exc``."""
        self._log.critical("uffd_aio.server_fatal", error=f"{type(exc).__name__}: {exc}",
                           on_fatal=self.options.on_fatal, clients=len(self._clients))
        if self.options.on_fatal == "kill-clients":
            self.kill_clients(f"server failure: {type(exc).__name__}: {exc}")
        if self._fatal is None and self._loop is not None:
            self._fatal = self._loop.create_future()
        if self._fatal is not None and not self._fatal.done():
            self._fatal.set_result(exc)

    def kill_clients(self, reason: str) -> int:
        """SIGKILL every client process (the very instance that handed over: its start
        time is checked, and the pidfd is used when there is one).  Returns how many."""
        n = 0
        for c in list(self._clients.values()):
            if c.pid > 0 and _kill(c.pid, c.start_time, c.pidfd, c.log, reason):
                n += 1
        return n

    async def aclose(self) -> None:
        """Stop accepting, release every client (their faults then go back to the
        kernel: memory still missing makes their threads fail), remove the socket.

        With ``state_dir`` the clients are *left* instead: their state files and fds
        stay (in the fd keeper or systemd's store) and the next server started on the
        directory serves them again; until then their faults wait."""
        if self._closed.is_set():
            return
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._takeover_task is not None and \
                self._takeover_task is not asyncio.current_task():
            self._takeover_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._takeover_task
        if self._lsock is not None:
            self._lsock.close()
            if not self.handed_over:  # after a takeover the new server listens there
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        if self.options.state_dir is not None and not self.handed_over:
            left = [c for c in self._clients.values() if c.pager is not None and c.stored]
            await asyncio.gather(*(self._detach(c) for c in left))
            if left:
                self._log.info("uffd_aio.clients_left", clients=len(left),
                               hint="state and fds kept: the next server started with "
                                    "this --state-dir serves them again")
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for c in list(self._detached_clients):
            c.close_kept()
        self._detached_clients.clear()
        if self._tsock is not None:
            self._tsock.close()
            if not self.handed_over and self.options.state_dir is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.options.state_dir, TAKEOVER_SOCKET))
        if self._store is not None:
            self._store.close()
        self._unlock()
        if self._ring is not None:
            self._ring.close()
        if self._src_map is not None:
            from uffd_aio.binding import lowlevel as ll

            with contextlib.suppress(OSError):
                ll.munmap(*self._src_map)
            self._src_map = None
        if self._src_fd is not None:
            os.close(self._src_fd)
            self._src_fd = None
        if self.close_backend:
            await self.backend.aclose()
        self._closed.set()
        self._log.info("uffd_aio.server_closed", handed_over=self.handed_over,
                       **attrs.asdict(self.stats))

    # ---- introspection ----------------------------------------------------------

    def call_later_while_open(self, delay: float, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the server's loop in ``delay`` s, unless the server closed."""
        if self._loop is not None and not self._closed.is_set():
            self._loop.call_later(delay, fn)

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
            if len(self._pending) >= self.options.max_pending:
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

    def _accept_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            self.fatal(exc)

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
                  f"{time.monotonic() - oldest.since:.3f} s when {self.options.max_pending} "
                  "connections were pending (max_pending): dropped the oldest")
        if oldest.task is not None:
            oldest.task.cancel()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # never: _serve_client
            self._log.error("uffd_aio.client_task_failed",  # catches everything
                            error=repr(task.exception()), exc_info=task.exception())

    # ---- one client ----------------------------------------------------------------

    async def _serve_client(self, client: _Client, recovered: bool = False) -> None:
        """One connection, start to end: every way it can end is logged and counted."""
        try:
            if recovered:
                client.stop_reason = await self._wait_gone(client)
            else:
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
        assert sock is not None
        try:
            client.pid, client.uid, _ = peer_credentials(sock)
        except OSError as exc:
            client.log.error("uffd_aio.handoff_invalid", error=f"SO_PEERCRED: {exc}")
            self.stats.invalid += 1
            return
        client.log = client.log.bind(peer_pid=client.pid, peer_uid=client.uid)
        client.log.info("uffd_aio.client_connected")
        try:
            o = self.options
            h = await receive(sock, timeout=o.handoff_timeout, max_payload=o.max_payload,
                              max_mappings=o.max_mappings, max_total=o.max_total,
                              allow_uids=o.allow_uids)
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
        if len(self._clients) >= self.options.max_clients:
            h.close()
            self.stats.rejected += 1
            client.log.error("uffd_aio.too_many_clients", limit=self.options.max_clients,
                             error=f"peer pid {client.pid} uid {client.uid} handed off "
                                   f"while {self.options.max_clients} clients were being served "
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
        client.gid = h.gid
        if client.start_time is None:
            client.start_time = process_start_time(client.pid)
            if client.start_time is None:
                raise ProcessLookupError(f"process {client.pid} exited right after its "
                                         "handoff")
        if self.options.state_dir is not None and client.keep_uffd < 0:
            client.keep_uffd = os.dup(h.uffd_fd)  # for a takeover (the pager owns h's)
        uffd = Userfaultfd.from_fd(h.uffd_fd)
        opts = PagerOptions(close_timeout=2.0)
        opts.update(self.options.pager)
        pager = Pager(uffd=uffd, ring=self._ring, name=f"client{client.id}",
                      on_error=self.options.on_error, **opts)
        try:
            pager.start()
        except BaseException:
            uffd.close()
            raise
        client.pager = pager
        pager.on_event(lambda msg: self._on_event(client, msg))
        if self.options.record_set is not None:
            from uffd_aio.workingset import WorkingSetRecorder

            ps = h.mappings[0].page_size
            pages, sid = self._snapshot_identity(ps)
            if pages is None:
                pages = max(m.offset + m.size for m in h.mappings) // ps
            client.ws_recorder = WorkingSetRecorder(
                page_size=ps, store_pages=pages, snapshot_id=sid,
                max_pages=self.options.record_set_pages,
                max_seconds=self.options.record_set_seconds)
        if self.options.record is not None:
            from uffd_aio.serving.readahead import FaultRecorder

            # one recorder for all the client's mappings: traces hold store pages
            client.recorder = FaultRecorder(None, page_size=h.mappings[0].page_size)
        for i, m in enumerate(h.mappings):
            region = pager.adopt(m.base_host_virt_addr, m.size, store_offset=m.offset,
                                 page_size=m.page_size, name=f"client{client.id}.map{i}")
            self._serve_region(client, region, m.offset)
        if self._ws is not None:
            self._start_install(client, h)
        if self.options.state_dir is not None and not self._defer_store:
            self._store_client(client)

    def _serve_region(self, client: _Client, region: Region, store_offset: int) -> None:
        plan = self._native_plan(region, store_offset)
        if not isinstance(plan, str):
            file, readahead = plan
            source = _ZERO if file is None else file
            try:
                region.serve_from(source, offset=store_offset if source is not _ZERO else 0,
                                  readahead=readahead,
                                  record=self._native_recorder(client, region, store_offset))
            except (OSError, ValueError, TypeError) as exc:
                plan = f"serve_from refused the region: {exc}"
        # The Python path, also behind a native region: what the engine passes up (EAGAIN
        # while the client's mm changes, page-cache misses without a read slot, errors)
        # goes to the same attach handler as without the engine (the shared backend: its
        # error policy, e.g. SIGBUS for a truncated snapshot), not to serve_from's own
        # fallback, whose file descriptor is closed as soon as the engine lets go of the
        # region (stop_reading before a takeover) while such faults may still be running;
        # and a --replay prefetches through it alongside the native faults (a page the
        # engine placed first makes its UFFDIO_COPY skip, EEXIST)
        self._attach_python(client, region, store_offset)
        if isinstance(plan, str):
            client.python_regions += 1
            self.stats.python_regions += 1
            if self._native_capable():
                client.log.debug("uffd_aio.client_python_path", region=region.name,
                                 reason=plan)
        else:
            client.native_regions += 1
            self.stats.native_regions += 1
            client.log.debug("uffd_aio.client_native_path", region=region.name,
                             source=repr(_ZERO) if plan[0] is None else self.backend.name,
                             offset=store_offset, replay=self._replay is not None)

    @staticmethod
    def _native_recorder(client: _Client, region: Region, store_offset: int
                         ) -> Callable[[int, int, bool], None] | None:
        """The engine's first touches of ``region`` into the client's recorders (None
        when nothing records), as the Python path records them (``attach``): ``--record``
        the faulting page and the pages its window placed (store pages; repeats
        ignored), ``--record-set`` the faulting page and whether it was a write (the
        window is one page then, see :meth:`_native_plan`)."""
        trace, ws = client.recorder, client.ws_recorder
        if trace is None and ws is None:
            return None
        page0 = store_offset // region.page_size

        def record(page: int, pages: int, write: bool) -> None:
            if ws is not None:
                ws.record(page0 + page, write)
            if trace is not None and pages:
                trace.record_range(page0 + page, pages)

        return record

    def _native_capable(self) -> bool:
        from uffd_aio.stores.file import FileBackend
        from uffd_aio.stores.zero import ZeroBackend

        return isinstance(self.backend, (FileBackend, ZeroBackend))

    def _native_plan(self, region: Region, store_offset: int
                     ) -> tuple[FileBackend | None, int | tuple[int, int]] | str:
        """``(file, readahead)`` for :meth:`Region.serve_from` (no file: zeros,
        :data:`uffd_aio.ZERO`), or why ``region`` stays on the Python path (every fault
        through :func:`~uffd_aio.serving.attach.attach`).

        Native: a ``file:`` backend (the snapshot's fd, the mapping's ``offset``) or
        ``zero``, with the read-ahead policy as the engine's window (one page with
        ``record_set``, as in Python); ``record``/``record_set`` are fed from the
        engine's log (:meth:`_native_recorder`).  Python: ``native`` off, another
        backend, ``dirty`` tracking (write-protect faults), ``remove="zero"`` on a file
        (removed ranges read as zeros), a mapping past the end of the file (zeros there),
        huge pages, a read-ahead policy the engine has no equivalent for."""
        backend = self.backend
        why = self.options.python_only
        if why is not None and not self.options.native:
            return why
        if not self._native_capable():
            return f"backend {backend.name} has no native source"
        if why is not None:
            return why
        if region.page_size != _PAGE_SIZE:
            return "huge pages: the native engine serves base pages only"
        readahead = self._native_window
        if isinstance(readahead, str):
            return readahead
        if self.options.record_set is not None:
            # as on the Python path (_attach_python): a window would place pages that then
            # never fault, so the set could not tell whether the client touched them
            readahead = 1
        if not isinstance(backend, FileBackend):
            return None, readahead
        if self.options.remove == "zero":
            return "--remove zero: removed ranges of a file are served as zeros by Python"
        if store_offset + region.length > backend.size:
            return (f"the mapping ends past the end of {backend.path!r} ({backend.size} "
                    "bytes): Python serves zeros there")
        return backend, readahead

    def _native_readahead(self) -> int | tuple[int, int] | str:
        """The engine's window for the read-ahead option (once per server): pages, or
        (min, max) for an adaptive one; or why the engine cannot do it."""
        spec = self.options.attach.readahead
        policy = spec.policy()
        if not isinstance(policy, (NoReadahead, FixedWindow, AdaptiveWindow)):
            return f"read-ahead {spec.text} has no native equivalent: a custom policy"
        try:
            lo, hi = readahead_bounds(policy)
        except ValueError as exc:
            return f"read-ahead {spec.text} has no native equivalent: {exc}"
        return lo if lo == hi else (lo, hi)

    def _attach_python(self, client: _Client, region: Region, store_offset: int) -> None:
        a = self.options.attach
        replay = self._replay
        client.attachments.append(attach(
            region, self.backend, store_offset=store_offset,
            # with --record-set, a window would hide the pages it brought in
            readahead=None if client.ws_recorder is not None else a.readahead.policy(),
            dirty=a.dirty, recorder=client.recorder,
            # attach keeps the pages of this mapping
            replay=replay[1] if replay is not None and replay[0] == region.page_size
            else None,
            replay_concurrency=a.replay_concurrency, replay_batch=a.replay_batch,
            replay_max_wait=a.replay_max_wait, eager=a.eager,
            zero_removed=client.removed if self.options.remove == "zero" else None,
            observe=client.ws_recorder.record if client.ws_recorder is not None else None))

    def _on_event(self, client: _Client, msg: Fork | Remap | Remove | Unmap) -> None:
        from uffd_aio.events import Remove

        if isinstance(msg, Remove):
            client.removes += 1
            if self.options.remove == "zero":
                client.removed.add(msg.start, msg.end)
                if client.stored and client.state_flush is None and self._loop is not None:
                    # coalesced: a balloon sends REMOVEs in bursts; a crash within the
                    # window refetches those pages from the backend (harmless)
                    client.state_flush = self._loop.call_later(0.1, self._flush_state,
                                                               client)
            client.log.debug("uffd_aio.client_remove", start=hex(msg.start), end=hex(msg.end))

    async def _wait_gone(self, client: _Client) -> str:
        """Wait for socket EOF or process exit; returns why the client is gone."""
        loop = asyncio.get_running_loop()
        waits: dict[asyncio.Future[str | None], str] = {}
        pidfd = -1
        try:
            try:
                pidfd = os.pidfd_open(client.pid)
            except ProcessLookupError:
                return "process exited"
            except OSError as exc:  # no pidfd (old kernel, another pid namespace)
                client.log.warning("uffd_aio.no_pidfd", error=str(exc))
            if pidfd >= 0 and client.start_time is not None and \
                    process_start_time(client.pid) != client.start_time:
                return "process exited"  # the pid is another process's now
            client.pidfd = pidfd
            if pidfd >= 0:
                waits[asyncio.ensure_future(wait_readable(loop, pidfd))] = "process exited"
            elif client.sock is None:
                waits[asyncio.ensure_future(self._poll_alive(client))] = "process exited"
            if client.sock is not None:
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
                    if reason == "connection closed" and self.options.keep_after_eof and pidfd >= 0:
                        client.log.info("uffd_aio.client_eof_kept")
                        continue
                    return reason
        finally:
            for fut in waits:
                fut.cancel()
            for fut in waits:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await fut
            client.pidfd = -1
            if pidfd >= 0:
                os.close(pidfd)

    async def _poll_alive(self, client: _Client) -> None:
        while client.start_time is not None and \
                alive(client.pid, client.start_time):  # noqa: ASYNC110 (no pidfd)
            await asyncio.sleep(1.0)

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
        assert sock is not None
        while True:
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                await wait_readable(loop, sock.fileno())
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
        if client.detached:  # stopped by _detach; its fds and state live on
            return
        if client.state_flush is not None:
            client.state_flush.cancel()
            client.state_flush = None
        client.close_kept()
        if client.stored:
            self._forget_client(client, client.stop_reason or "released")
        pager = client.pager
        if pager is None:
            return
        ws_metrics: dict[str, object] = {}
        if client.installer is not None:
            ws_metrics = {"ws_" + k: v for k, v in client.installer.metrics.as_dict().items()
                          if k in ("pages_by_replay", "pages_by_fill", "pages_read",
                                   "set_installed_s", "fully_resident_s")}
        await self._stop_install(client)
        if client.ws_recorder is not None and len(client.ws_recorder):
            self._save_set(client)
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
        s.resolved_bytes += _resolved_bytes(st)
        s.errors += st.errors
        s.native_faults += st.native_faults
        s.python_faults += st.python_faults
        client.log.info("uffd_aio.client_released", reason=client.stop_reason or "server closing",
                        faults=st.faults, resolved_bytes=_resolved_bytes(st), errors=st.errors,
                        native_faults=st.native_faults, python_faults=st.python_faults,
                        path=client.path, removes=client.removes,
                        seconds=round(time.monotonic() - client.since, 3), **ws_metrics)


    def _save_trace(self, client: _Client) -> None:
        assert self.options.record is not None
        tmp = f"{self.options.record}.tmp{os.getpid()}"
        rec = client.recorder
        assert rec is not None
        try:
            rec.save(tmp)
            os.replace(tmp, self.options.record)  # readers never see half a trace
        except OSError as exc:
            client.log.error("uffd_aio.trace_save_failed", path=self.options.record, error=str(exc))
            return
        client.log.info("uffd_aio.trace_saved", path=self.options.record, pages=len(rec))

    # ---- crash safety and upgrades (--state-dir, --takeover) ------------------------------

    def _state_path(self, key: str) -> str:
        assert self.options.state_dir is not None
        return os.path.join(self.options.state_dir, "clients", f"{key}.json")

    def _client_state(self, client: _Client) -> ClientState:
        h = client.handoff
        assert h is not None and client.start_time is not None
        return ClientState(pid=client.pid, start_time=client.start_time, uid=client.uid,
                           gid=client.gid, backend=self._fingerprint, mappings=h.mappings,
                           fds=(client.key,), removed=tuple(client.removed),
                           removes=client.removes, adopted_at=time.time(),
                           generation=client.state_generation)

    def _write_state(self, client: _Client) -> None:
        client.state_generation += 1
        write_atomic(self._state_path(client.key), encode(self._client_state(client)))

    def _store_client(self, client: _Client) -> None:
        """Put the client's fds in the store and write its state file (at adoption)."""
        assert self._store is not None and client.start_time is not None
        fds = [client.keep_uffd] + ([client.sock.fileno()] if client.sock is not None else [])
        try:
            self._store.put(client.key, fds, client.pid, client.start_time)
            self._write_state(client)
        except (OSError, StoreError) as exc:
            # still served; only a crash of this server would now hang it
            client.log.error("uffd_aio.state_save_failed", error=str(exc),
                             hint="this client is served, but not crash-safe")
            return
        client.stored = True

    def _flush_state(self, client: _Client) -> None:
        client.state_flush = None
        if not client.stored or client.detached:
            return
        try:
            self._write_state(client)
        except OSError as exc:
            client.log.error("uffd_aio.state_save_failed", error=str(exc))

    def _forget_client(self, client: _Client, reason: str) -> None:
        """The client is gone: remove its state file and its fds from the store."""
        client.stored = False
        self._forget(client.key, reason, client.log)

    def _forget(self, key: str, reason: str, log: FilteringBoundLogger) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._state_path(key))
        if self._store is not None:
            try:
                self._store.drop(key)
            except (OSError, StoreError) as exc:
                log.warning("uffd_aio.fd_store_drop_failed", key=key, error=str(exc))
        log.info("uffd_aio.state_dropped", key=key, reason=reason)

    def _lock(self, wait: float) -> None:
        assert self.options.state_dir is not None
        if self._lock_fd >= 0:
            return
        fd = os.open(os.path.join(self.options.state_dir, "lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.005)
                    continue
                os.close(fd)
                raise FileExistsError(
                    errno.EBUSY, "another server uses the state directory "
                                 f"{self.options.state_dir} (start the new one with "
                                 "--takeover to replace it)") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _open_store(self) -> FdStore:
        assert self.options.state_dir is not None
        choice = self.options.fd_store
        if choice == "systemd" or (choice == "auto" and os.environ.get("NOTIFY_SOCKET")):
            if not os.environ.get("NOTIFY_SOCKET"):
                raise ValueError("fd_store='systemd' needs NOTIFY_SOCKET (run under systemd "
                                 "with FileDescriptorStoreMax=)")
            return SystemdStore()
        try:
            store = KeeperStore(self.options.state_dir, idle=self.options.keeper_idle)
        except StoreError as exc:
            raise OSError(errno.EIO, f"cannot start the fd keeper: {exc}") from None
        if store.started_keeper is not None:
            self._log.info("uffd_aio.fdkeeper_started", pid=store.started_keeper,
                           socket=store.path)
        return store

    def _wake(self, client: _Client) -> None:
        """WAKE every range: a fault whose message a dead (or the old) server read but
        never resolved sleeps until then, and now faults again (a new message)."""
        assert client.pager is not None and client.handoff is not None
        uffd = client.pager.uffd
        for m in client.handoff.mappings:
            try:
                uffd.wake(m.base_host_virt_addr, m.size)
            except Exception as exc:  # ESRCH: its mm is gone (the process is exiting)
                client.log.warning("uffd_aio.wake_failed", error=str(exc),
                                   range=f"{m.base_host_virt_addr:#x}+{m.size:#x}")

    def _adopt_state(self, st: ClientState, fds: list[int], how: str) -> bool:
        """Serve again a client described by ``st``; ``fds``: [uffd, connection?] (owned)."""
        cid = next(self._ids)
        sock = None
        if len(fds) > 1:
            sock = socket.socket(fileno=fds[1])
            sock.setblocking(False)
        for extra in fds[2:]:
            with contextlib.suppress(OSError):
                os.close(extra)
        client = _Client(cid, sock, self._log.bind(client=cid, peer_pid=st.pid,
                                                   peer_uid=st.uid))
        client.pid, client.uid, client.gid = st.pid, st.uid, st.gid
        client.start_time = st.start_time
        client.removes = st.removes
        client.state_generation = st.generation
        for s_, e_ in st.removed:
            client.removed.add(s_, e_)
        h = Handoff(fds[0], st.mappings, st.pid, st.uid, st.gid)
        client.handoff = h
        self._clients[cid] = client
        try:
            self._adopt(client, h)
        except Exception as exc:
            self._clients.pop(cid, None)
            self.stats.failed += 1
            client.log.error("uffd_aio.client_setup_failed", how=how,
                             error=f"{type(exc).__name__}: {exc}")
            if client.pager is None:
                h.close()
            client.close_kept()
            return False
        self._wake(client)
        if how in ("restart", "resume"):
            client.stored = True  # fds in the store and state file as they were
        self.stats.served += 1
        self._changed.set()
        assert self._loop is not None
        task = self._loop.create_task(self._serve_client(client, recovered=True))
        client.task = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        client.log.info("uffd_aio.client_readopted", how=how, mappings=len(h.mappings),
                        bytes=h.total, removed=len(list(client.removed)))
        return True

    def _recover(self) -> None:
        """Serve again every client a previous server left in the state directory."""
        assert self.options.state_dir is not None and self._store is not None
        t0 = time.monotonic()
        rep = RecoveryReport("state")
        cdir = os.path.join(self.options.state_dir, "clients")
        keys: set[str] = set()
        for name in sorted(os.listdir(cdir)):
            path = os.path.join(cdir, name)
            if name.startswith(".") or not name.endswith(".json"):
                if name.startswith(".") and ".tmp" in name:  # a write the crash cut short
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read(MAX_STATE_BYTES + 1)
                st = decode(data, backend=self._fingerprint)
                if name != f"{st.key}.json":
                    raise StateError(f"file name {name!r} does not match its key {st.key!r}")
            except (OSError, StateError) as exc:
                rep.rejected += 1
                self._reject_state(path, str(exc))
                continue
            keys.add(st.key)
            if not alive(st.pid, st.start_time):
                rep.dropped += 1
                self._forget(st.key, "process exited while no server ran", self._log)
                continue
            fds = self._take_fds(st)
            if fds is None:
                rep.lost += 1
                self._lost(st)
                continue
            self._defer_store = True  # its fds are in the store, its state file is current
            try:
                ok = self._adopt_state(st, fds, "restart")
            finally:
                self._defer_store = False
            if ok:
                rep.adopted += 1
            else:
                rep.lost += 1
                self._lost(st, adopted=False)
        # fds in the store without a state file: a crash between put and write
        try:
            for key in self._store.names():
                if key not in keys:
                    pid, _, start = key.partition("-")
                    if not (pid.isdigit() and start.isdigit() and alive(int(pid), int(start))):
                        self._forget(key, "no state file and the process exited", self._log)
        except (OSError, StoreError) as exc:
            self._log.warning("uffd_aio.fd_store_list_failed", error=str(exc))
        rep.seconds = round(time.monotonic() - t0, 6)
        self.recovery = rep
        self._log.info("uffd_aio.recovered", **attrs.asdict(rep))

    def _reject_state(self, path: str, reason: str) -> None:
        """A corrupt or foreign state file: kept aside (never deleted), logged, skipped."""
        assert self.options.state_dir is not None
        rdir = os.path.join(self.options.state_dir, "rejected")
        os.makedirs(rdir, mode=0o700, exist_ok=True)
        dest = os.path.join(rdir, f"{os.path.basename(path)}.{int(time.time())}")
        try:
            os.replace(path, dest)
        except OSError:
            dest = path
        self._log.error("uffd_aio.state_rejected", path=path, moved_to=dest, error=reason)

    def _take_fds(self, st: ClientState) -> list[int] | None:
        assert self._store is not None
        try:
            fds = self._store.take(st.key)
        except (OSError, StoreError) as exc:
            self._log.error("uffd_aio.fd_store_failed", key=st.key, error=str(exc))
            fds = None
        if fds and not is_uffd(fds[0]):
            self._log.error("uffd_aio.fd_store_failed", key=st.key,
                            error="the stored fd is not a userfaultfd")
            close_all(fds)
            fds = None
        if fds is None and self.options.pidfd_getfd:
            fd = steal_uffd(st.pid, st.start_time)
            if fd is not None:
                self._log.warning("uffd_aio.uffd_from_client", peer_pid=st.pid,
                                  how="pidfd_getfd")
                fds = [fd]
        return fds

    def _lost(self, st: ClientState, adopted: bool = True) -> None:
        """An alive client whose uffd could not be had (or served): it cannot be served
        again by anyone; with on_fatal="kill-clients" it is killed instead of hanging."""
        log = self._log.bind(peer_pid=st.pid, key=st.key)
        log.error("uffd_aio.client_lost",
                  error="no copy of its uffd survived (fd store empty)" if adopted else
                        "its uffd could not be served again",
                  on_fatal=self.options.on_fatal)
        if self.options.on_fatal == "kill-clients":
            _kill(st.pid, st.start_time, -1, log, "its uffd was lost with the server")
        self._forget(st.key, "lost", self._log)

    async def _detach(self, client: _Client) -> None:
        """Stop serving ``client`` but keep everything a successor needs: the state file,
        the fds in the store, our uffd copy and its connection (for a takeover).

        Handlers still running get the pager's close timeout to finish; faults read but
        not resolved by then are abandoned: the successor's WAKE makes them fault again."""
        if client.detached or client.pager is None:
            return
        client.detached = True
        if client.state_flush is not None:
            client.state_flush.cancel()
            client.state_flush = None
            with contextlib.suppress(OSError):
                self._write_state(client)
        client.pager.stop_reading()  # else closing waits for a pause in the faults
        await self._stop_install(client)
        for att in client.attachments:
            with contextlib.suppress(Exception):
                await att.aclose()
        try:
            await client.pager.aclose(abandon_inflight=True)
        except Exception as exc:
            client.log.warning("uffd_aio.client_close_error",
                               error=f"{type(exc).__name__}: {exc}")
        st = client.pager.stats
        self.stats.faults += st.faults
        self.stats.resolved_bytes += _resolved_bytes(st)
        self.stats.errors += st.errors
        self.stats.native_faults += st.native_faults
        self.stats.python_faults += st.python_faults
        self._detached_clients.append(client)
        if client.task is not None and client.task is not asyncio.current_task():
            client.task.cancel()
        client.log.info("uffd_aio.client_detached", faults=st.faults)

    # -- takeover: the running (old) server's side

    def _listen_takeover(self) -> None:
        assert self.options.state_dir is not None and self._loop is not None
        path = os.path.join(self.options.state_dir, TAKEOVER_SOCKET)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # we hold the lock: any socket there is a predecessor's
        ts = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            ts.bind(path)
        finally:
            os.umask(old)
        ts.listen(4)
        ts.setblocking(False)
        self._tsock = ts
        self._takeover_task = self._loop.create_task(self._takeover_loop())

    async def _takeover_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._tsock is not None
        while True:
            conn, _ = await loop.sock_accept(self._tsock)
            try:
                done = await self._hand_over(conn)
            except Exception as exc:
                self._log.error("uffd_aio.takeover_failed", error=f"{type(exc).__name__}: {exc}",
                                exc_info=exc)
                done = False
            finally:
                conn.close()
            if done:
                self.handed_over = True
                self._closing_task = loop.create_task(self.aclose())
                return

    async def _hand_over(self, conn: socket.socket) -> bool:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        if peer_credentials(conn)[1] != os.getuid():
            self._log.error("uffd_aio.takeover_refused", error="peer of another uid")
            return False
        async with asyncio.timeout(10):
            req, fds = await _arecv(loop, conn)
        close_all(fds)
        err = None
        if req is None or req.get("op") != "takeover" or req.get("version") != TAKEOVER_VERSION:
            err = f"not a takeover request of version {TAKEOVER_VERSION}: {req!r:.200}"
        elif req.get("backend") != self._fingerprint:
            err = (f"the new server's backend {req.get('backend')!r} is not this server's "
                   f"{self._fingerprint!r}")
        elif req.get("socket") != self.path:
            err = f"the new server's socket {req.get('socket')!r} is not {self.path!r}"
        if err is not None:
            self._log.error("uffd_aio.takeover_refused", error=err)
            await _asend(loop, conn, {"ok": False, "error": err})
            return False
        t0 = time.monotonic()
        self._log.info("uffd_aio.takeover_started", clients=len(self._clients))
        # 1. no new connections (they wait in the listen backlog for the new server)
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        # 2. handoffs under way complete here first (a real VMM sends at once)
        deadline = time.monotonic() + self.options.handoff_timeout
        while self._pending and time.monotonic() < deadline:  # noqa: ASYNC110 (rare)
            await asyncio.sleep(0.005)
        for c in list(self._pending.values()):
            if c.task is not None:
                c.task.cancel()
        # 3. stop reading every uffd (running handlers finish within the close timeout)
        clients = [c for c in self._clients.values() if c.pager is not None and c.stored]
        await asyncio.gather(*(self._detach(c) for c in clients))
        stopped = time.monotonic()
        # 4. everything to the new server
        assert self._lsock is not None
        try:
            await _asend(loop, conn, {"ok": True, "op": "listen", "path": self.path},
                         [self._lsock.fileno()])
            for c in clients:
                fds = [c.keep_uffd] + ([c.sock.fileno()] if c.sock is not None else [])
                await _asend(loop, conn, {"op": "client",
                                          "state": encode(self._client_state(c)).decode()},
                             fds)
            await _asend(loop, conn, {"op": "end", "count": len(clients)})
            async with asyncio.timeout(60):
                reply, fds = await _arecv(loop, conn)
            close_all(fds)
        except (OSError, TimeoutError, StoreError) as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        if reply is None or reply.get("op") != "done":
            self._log.error("uffd_aio.takeover_failed", error=f"the new server did not take "
                            f"over: {reply!r:.300}", hint="serving every client again")
            self._resume(clients)
            return False
        self._unlock()  # the new server writes the state from now on
        with contextlib.suppress(OSError):
            await _asend(loop, conn, {"op": "bye"})
        for c in clients:
            c.close_kept()
        self._log.info("uffd_aio.handed_over", clients=len(clients),
                       stop_seconds=round(stopped - t0, 6),
                       seconds=round(time.monotonic() - t0, 6))
        return True

    def _resume(self, clients: list[_Client]) -> None:
        """A takeover failed after we stopped: serve our clients again, then accept again."""
        for c in clients:
            self._detached_clients.remove(c)
            st = self._client_state(c)
            fds = [c.keep_uffd]
            c.keep_uffd = -1
            if c.sock is not None:
                fds.append(os.dup(c.sock.fileno()))
                c.sock.close()
            self._adopt_state(attrs.evolve(st, generation=c.state_generation), fds, "resume")
        assert self._loop is not None
        self._accept_task = self._loop.create_task(self._accept_loop())
        self._accept_task.add_done_callback(self._accept_done)

    # -- takeover: the new server's side

    async def _request_takeover(self) -> _Received:
        assert self.options.state_dir is not None
        loop = asyncio.get_running_loop()
        path = os.path.join(self.options.state_dir, TAKEOVER_SOCKET)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            try:
                conn.connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise ConnectionRefusedError(
                    errno.ECONNREFUSED, f"no server to take over: nothing listens on {path} "
                    "(start without --takeover to serve the state directory's clients "
                    "again)") from None
            conn.setblocking(False)
            await _asend(loop, conn, {"op": "takeover", "version": TAKEOVER_VERSION,
                                      "backend": self._fingerprint, "socket": self.path})
            got = _Received(conn)
            async with asyncio.timeout(60):
                while True:
                    msg, fds = await _arecv(loop, conn)
                    if msg is None:
                        close_all(fds)
                        raise ConnectionError("the running server closed the takeover "
                                              "connection")
                    op = msg.get("op")
                    if msg.get("ok") is False:
                        close_all(fds)
                        raise ConnectionRefusedError(
                            errno.ECONNREFUSED,
                            f"the running server refused the takeover: {msg.get('error')}")
                    if op == "listen" and len(fds) == 1 and got.lsock is None:
                        got.lsock = socket.socket(fileno=fds[0])
                        got.lsock.setblocking(False)
                    elif op == "client" and fds:
                        try:
                            st = decode(str(msg.get("state", "")).encode(),
                                        backend=self._fingerprint)
                        except StateError as exc:
                            close_all(fds)
                            self._log.error("uffd_aio.state_rejected", how="takeover",
                                            error=str(exc))
                            continue
                        got.clients.append((st, fds))
                    elif op == "end" and got.lsock is not None:
                        break
                    else:
                        close_all(fds)
                        raise ConnectionError(f"unexpected takeover message {msg!r:.200}")
        except BaseException:
            conn.close()
            raise
        return got

    async def _adopt_received(self, got: _Received) -> None:
        assert self._loop is not None
        t0 = time.monotonic()
        rep = RecoveryReport("takeover")
        clients, got.clients = got.clients, []
        self._defer_store = True
        try:
            self._adopt_all(clients, rep)
        finally:
            self._defer_store = False
        # adopted and woken: the old server may go (it closes its copies, our fds stay)
        await _asend(self._loop, got.conn, {"op": "done", "adopted": rep.adopted})
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(10):
                await _arecv(self._loop, got.conn)  # "bye": it released the lock
        got.conn.close()
        await asyncio.to_thread(self._lock, 10.0)
        for c in list(self._clients.values()):  # the fd store and state are ours from now
            if c.pager is not None and not c.stored:
                self._store_client(c)
        rep.seconds = round(time.monotonic() - t0, 6)
        self.recovery = rep
        self._log.info("uffd_aio.took_over", **attrs.asdict(rep))

    def _adopt_all(self, clients: list[tuple[ClientState, list[int]]],
                   rep: RecoveryReport) -> None:
        for st, fds in clients:
            if not alive(st.pid, st.start_time):
                close_all(fds)
                rep.dropped += 1
                self._forget(st.key, "process exited", self._log)
            elif self._adopt_state(st, fds, "takeover"):
                rep.adopted += 1
            else:
                rep.lost += 1


class _Received:
    """What a takeover brought: the listening socket and every client's state + fds."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.lsock: socket.socket | None = None
        self.clients: list[tuple[ClientState, list[int]]] = []

    def close(self) -> None:
        for _, fds in self.clients:
            close_all(fds)
        self.clients = []
        self.conn.close()


async def _asend(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 obj: Mapping[str, object], fds: list[int] | None = None) -> None:
    while True:
        try:
            send_msg(sock, obj, fds or [])
            return
        except (BlockingIOError, InterruptedError):
            await _writable(loop, sock.fileno())


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


async def _arecv(loop: asyncio.AbstractEventLoop, sock: socket.socket
                 ) -> tuple[dict[str, object] | None, list[int]]:
    while True:
        try:
            return recv_msg(sock)
        except (BlockingIOError, InterruptedError):
            await wait_readable(loop, sock.fileno())


def _kill(pid: int, start_time: int | None, pidfd: int, log: FilteringBoundLogger,
          reason: str) -> bool:
    """SIGKILL process ``pid`` if it is still the instance that started at ``start_time``."""
    if start_time is None or process_start_time(pid) != start_time:
        log.warning("uffd_aio.client_not_killed", peer_pid=pid,
                    reason="the process is gone (or the pid is another process's now)")
        return False
    try:
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    except OSError as exc:
        log.error("uffd_aio.client_kill_failed", peer_pid=pid, error=str(exc))
        return False
    log.error("uffd_aio.client_killed", peer_pid=pid, reason=reason)
    return True


def steal_uffd(pid: int, start_time: int) -> int | None:
    """The last resort when no copy of a client's uffd survived: take it from the client
    itself with ``pidfd_getfd(2)`` (Linux 5.6+; needs ptrace access to the client: the
    same uid and no Yama ``ptrace_scope`` >= 1 restriction, or CAP_SYS_PTRACE).  The fd
    number is not in the handoff: /proc/PID/fd is scanned for ``anon_inode:[userfaultfd]``
    and exactly one must be there (a client with several uffds is ambiguous: None)."""
    import ctypes

    try:
        found = [int(n) for n in os.listdir(f"/proc/{pid}/fd")
                 if os.readlink(f"/proc/{pid}/fd/{n}") == "anon_inode:[userfaultfd]"]
    except OSError:
        return None
    if len(found) != 1 or process_start_time(pid) != start_time:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.syscall(_SYS_PIDFD_GETFD, pidfd, found[0], 0))
        if fd < 0:
            return None
        if process_start_time(pid) != start_time or not is_uffd(fd):
            os.close(fd)
            return None
        os.set_inheritable(fd, False)
        return fd
    finally:
        os.close(pidfd)


_SYS_PIDFD_GETFD = 438  # the same number on every architecture (a 5.6 addition)
TAKEOVER_SOCKET = "takeover.sock"
TAKEOVER_VERSION = 1
