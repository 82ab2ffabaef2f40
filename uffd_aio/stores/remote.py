"""RedisBackend: remote memory in Redis (``redis://`` / ``rediss://`` / ``redis+cluster://`` SPEC).

Page ``i`` of the store (store offset ``i * page_size``) is the Redis string
at key ``prefix + str(i)``; a missing key reads as a zero page, a shorter
value is zero-padded.  A read-ahead window is fetched with ONE ``MGET``
(one round trip); on a cluster, redis-py's ``mget_nonatomic`` groups the
keys by slot and pipelines one MGET per node.

Fetches issued together (several faulting threads) are *coalesced*: those
queued in the same loop iteration, or while ``max_batches`` (4) MGETs are
already out, share the next MGET (auto-pipelining; ``coalesce=0`` turns it
off).  A read-ahead window is still never split.

URL: ``redis://[user:pass@]host:port/db?prefix=P&page_size=N&max_connections=N
&retry_for=SECONDS&coalesce=0|1&max_batches=N`` (``prefix`` defaults to ``uffd:``).  ``redis+cluster://host:port``
uses :class:`redis.asyncio.cluster.RedisCluster`.

While Redis is unreachable (down, restarting, loading its dataset) every
request is retried with exponential backoff (10 ms doubling to 1 s): the
faulting threads simply wait and resume once Redis answers again; nothing
is mapped from a failed request.  ``retry_for`` bounds the wait (default:
no bound; the pager's ``handler_timeout`` can bound it too), after which
:class:`BackendError` is raised and the pager's error policy applies.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from uffd_aio.errors import MissingExtra
from uffd_aio.log import get_logger
from uffd_aio.stores.base import BackendError, Buffer

try:
    import redis.asyncio as aioredis
    import redis.exceptions as rexc
    from redis.asyncio.cluster import RedisCluster
except ImportError as _exc:  # redis-py is the optional extra [redis]
    raise MissingExtra("redis", "redis", "the Redis backend") from _exc

__all__ = ["RedisBackend"]

_PAGE = os.sysconf("SC_PAGE_SIZE")
T = TypeVar("T")

#: errors that mean "Redis is not answering right now": retry
_TRANSIENT: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # includes BusyLoadingError (restarting, loading the RDB)
    rexc.TimeoutError,
    rexc.TryAgainError,
    rexc.ClusterDownError,
    ConnectionError,
    OSError,
)


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """(URL for redis-py, our options) from a backend URL."""
    parts = urlsplit(url)
    ours = {"prefix", "page_size", "max_connections", "retry_for", "coalesce", "max_batches"}
    q = parse_qsl(parts.query, keep_blank_values=True)
    opts = {k: v for k, v in q if k in ours}
    rest = [(k, v) for k, v in q if k not in ours]
    scheme = "redis" if parts.scheme == "redis+cluster" else parts.scheme
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), "")), opts


class RedisBackend:
    """Pages as Redis strings; see the module docstring."""

    #: redis-py's asyncio client uses ``asyncio.timeout``, which needs a running Task
    eager = False

    def __init__(self, client: Any, *, prefix: str = "uffd:", page_size: int = _PAGE,
                 cluster: bool = False, retry_for: float | None = None,
                 name: str | None = None, coalesce: bool = True,
                 max_batches: int = 4) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two")
        self.client = client
        self.prefix = prefix
        self.page_size = page_size
        self.cluster = cluster
        self.retry_for = retry_for
        self.name = name or f"redis(prefix={prefix!r})"
        self._zero = bytes(page_size)
        self._log = get_logger(component="redis", backend=self.name)
        self._down_since: float | None = None
        #: coalesce concurrent fetches into shared MGETs (``coalesce=0`` in the URL: off)
        self.coalesce = coalesce
        #: MGETs out at once before fetches queue up (and then share the next one)
        self.max_batches = max_batches
        self.batch_keys = 1024
        self._queue: deque[tuple[list[bytes], asyncio.Future[list[bytes | None]]]] = deque()
        self._flush_scheduled = False
        self._batches = 0
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.coalesced = 0
        #: counters
        self.requests = 0
        self.retries = 0
        self.outages = 0

    @classmethod
    async def open(cls, url: str, **kw: Any) -> RedisBackend:
        """Connect to the Redis (or Redis Cluster) that ``url`` names (see the module docstring).

        Keyword arguments override URL options (``prefix``, ``page_size``,
        ``max_connections``, ``retry_for``).  The connection is made lazily:
        opening succeeds while Redis is still down.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "redis+cluster"):
            raise ValueError(f"not a Redis URL: {url!r}")
        client_url, opts = _split_url(url)
        prefix = str(kw.pop("prefix", opts.get("prefix", "uffd:")))
        page_size = int(kw.pop("page_size", opts.get("page_size", _PAGE)))
        max_conn = int(kw.pop("max_connections", opts.get("max_connections", 16)))
        rf = kw.pop("retry_for", opts.get("retry_for"))
        retry_for = None if rf in (None, "", "none") else float(rf)
        co = kw.pop("coalesce", opts.get("coalesce", True))
        coalesce = co not in ("0", "false", "no", "off", False)
        max_batches = int(kw.pop("max_batches", opts.get("max_batches", 4)))
        common: dict[str, Any] = {"socket_timeout": 10.0, "socket_connect_timeout": 2.0,
                                  "decode_responses": False}
        common.update(kw)
        cluster = parts.scheme == "redis+cluster"
        client: Any
        if cluster:
            client = RedisCluster.from_url(client_url, max_connections=max_conn, **common)
        else:
            pool = aioredis.BlockingConnectionPool.from_url(
                client_url, max_connections=max_conn, timeout=None, **common)
            client = aioredis.Redis(connection_pool=pool)
        where = parts.hostname or "localhost"
        if parts.port:
            where += f":{parts.port}"
        kind = "redis-cluster" if cluster else "redis"
        return cls(client, prefix=prefix, page_size=page_size, cluster=cluster,
                   retry_for=retry_for, coalesce=coalesce, max_batches=max_batches,
                   name=f"{kind}://{where}{parts.path or ''}?prefix={prefix}")

    # ---- keys ----------------------------------------------------------------

    def key(self, page: int) -> bytes:
        return f"{self.prefix}{page}".encode()

    def _pages(self, offset: int, length: int) -> range:
        ps = self.page_size
        if offset % ps or length % ps or length <= 0:
            raise BackendError(f"{self.name}: {length} bytes at {offset:#x} is not "
                               f"page-aligned ({ps})")
        return range(offset // ps, (offset + length) // ps)

    # ---- retry -----------------------------------------------------------------

    async def _retry(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        delay = 0.01
        start: float | None = None
        while True:
            self.requests += 1
            try:
                res = await fn()
            except _TRANSIENT as exc:
                now = time.monotonic()
                if start is None:
                    start = now
                if self._down_since is None:
                    self._down_since = now
                    self.outages += 1
                    self._log.warning("uffd_aio.redis_unavailable", op=what,
                                      error=f"{type(exc).__name__}: {exc}",
                                      hint="faults wait and are retried with backoff")
                if self.retry_for is not None and now - start >= self.retry_for:
                    raise BackendError(f"{self.name}: {what} failed for {now - start:.1f} s: "
                                       f"{exc}") from exc
                self.retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if self._down_since is not None:
                self._log.info("uffd_aio.redis_recovered", op=what,
                               down_s=round(time.monotonic() - self._down_since, 3))
                self._down_since = None
            return res

    # ---- PageStore -----------------------------------------------------------------

    async def fetch(self, offset: int, length: int) -> Buffer | None:
        pages = self._pages(offset, length)
        keys = [self.key(p) for p in pages]
        values = await (self._coalesced(keys) if self.coalesce else self._mget(keys))
        if len(pages) == 1:
            v = values[0]
            return None if v is None else self._fit(v, pages[0])
        if all(v is None for v in values):
            return None
        ps = self.page_size
        out = bytearray(length)
        for i, v in enumerate(values):
            if v is not None:
                out[i * ps:(i + 1) * ps] = self._fit(v, pages[i])
        return out

    async def _mget(self, keys: list[bytes]) -> list[bytes | None]:
        client = self.client
        if len(keys) == 1:
            k = keys[0]
            return [await self._retry("GET", lambda: client.get(k))]
        if self.cluster:
            return list(await self._retry("MGET", lambda: client.mget_nonatomic(keys)))
        return list(await self._retry("MGET", lambda: client.mget(keys)))

    # ---- coalescing: fetches issued together share one MGET ------------------------

    def _coalesced(self, keys: list[bytes]) -> asyncio.Future[list[bytes | None]]:
        """Queue ``keys``; fetches queued in the same loop iteration, or while
        ``max_batches`` MGETs are already out, go together in the next MGET."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[bytes | None]] = loop.create_future()
        self._queue.append((keys, fut))
        if not self._flush_scheduled and self._batches < self.max_batches:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._queue and self._batches < self.max_batches:
            batch: list[tuple[list[bytes], asyncio.Future[list[bytes | None]]]] = []
            n = 0
            while self._queue and (not batch or n + len(self._queue[0][0]) <= self.batch_keys):
                item = self._queue.popleft()
                batch.append(item)
                n += len(item[0])
            self._batches += 1
            self.batches += 1
            self.coalesced += len(batch) - 1
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)

    async def _run_batch(self, batch: list[tuple[list[bytes],
                                                 asyncio.Future[list[bytes | None]]]]) -> None:
        try:
            keys = [k for ks, _ in batch for k in ks]
            try:
                values = await self._mget(keys)
            except BaseException as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception)
                                          else BackendError(f"{self.name}: fetch cancelled"))
                raise
            i = 0
            for ks, fut in batch:
                if not fut.done():
                    fut.set_result(values[i:i + len(ks)])
                i += len(ks)
        finally:
            self._batches -= 1
            if self._queue and not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _fit(self, v: bytes, page: int) -> bytes:
        ps = self.page_size
        if len(v) == ps:
            return v
        if len(v) < ps:
            return v + bytes(ps - len(v))
        raise BackendError(f"{self.name}: key {self.key(page)!r} holds {len(v)} bytes, more "
                           f"than a page ({ps})")

    async def store(self, offset: int, data: Buffer, *, batch_pages: int = 256) -> None:
        """Write pages (one MSET per ``batch_pages``, all pipelined)."""
        view = memoryview(data).cast("B")
        pages = self._pages(offset, view.nbytes)
        ps = self.page_size
        client = self.client
        for b in range(0, len(pages), batch_pages):
            chunk = {self.key(p): bytes(view[(p - pages[0]) * ps:(p - pages[0] + 1) * ps])
                     for p in pages[b:b + batch_pages]}
            if self.cluster:
                await self._retry("MSET", functools.partial(client.mset_nonatomic, chunk))
            else:
                await self._retry("MSET", functools.partial(client.mset, chunk))

    async def load(self, offset: int, data: Buffer, *, batch_pages: int = 256,
                   pipeline_depth: int = 8) -> None:
        """Put a dataset in: MSETs of ``batch_pages`` pages, ``pipeline_depth`` per round trip."""
        view = memoryview(data).cast("B")
        pages = self._pages(offset, view.nbytes)
        ps = self.page_size
        step = batch_pages * pipeline_depth
        for b in range(0, len(pages), step):
            batch = pages[b:b + step]
            if self.cluster:
                chunk = {self.key(p): bytes(view[(p - pages[0]) * ps:(p - pages[0] + 1) * ps])
                         for p in batch}
                await self._retry("MSET", functools.partial(self.client.mset_nonatomic, chunk))
                continue
            mappings = [{self.key(p): bytes(view[(p - pages[0]) * ps:(p - pages[0] + 1) * ps])
                         for p in batch[s:s + batch_pages]}
                        for s in range(0, len(batch), batch_pages)]
            await self._retry("MSET", functools.partial(self._mset_pipelined, mappings))

    async def _mset_pipelined(self, mappings: list[dict[bytes, bytes]]) -> Any:
        # a fresh pipeline per attempt: execute() empties it even when it fails
        pipe = self.client.pipeline(transaction=False)
        for m in mappings:
            pipe.mset(m)
        return await pipe.execute()

    async def delete_all(self, *, scan_count: int = 1000) -> int:
        """Delete every key under this backend's prefix; number deleted (tests, examples)."""
        n = 0
        batch: list[bytes] = []
        async for k in self.client.scan_iter(match=f"{self.prefix}*", count=scan_count):
            batch.append(k)
            if len(batch) >= scan_count:
                n += await self.client.unlink(*batch)
                batch.clear()
        if batch:
            n += await self.client.unlink(*batch)
        return n

    async def ping(self) -> bool:
        return bool(await self._retry("PING", self.client.ping))

    async def aclose(self) -> None:
        for t in list(self._batch_tasks):
            t.cancel()
        client = self.client
        if hasattr(client, "aclose"):
            await client.aclose()
        else:  # pragma: no cover (older redis-py)
            await client.close()
        if not self.cluster:
            await client.connection_pool.disconnect()

    def __repr__(self) -> str:
        return f"<RedisBackend {self.name}>"
