"""``uffd-aio serve``: the command (:func:`main`) and its Prometheus metrics.

The options are parsed once, into :class:`~uffd_aio.serve_options.ServeOptions`
(:func:`~uffd_aio.serve_options.add_arguments` defines them); the server itself is
:class:`uffd_aio.server.HandoffServer`.  :mod:`uffd_aio.server` re-exports
:func:`main`, :func:`start_metrics` and :func:`add_arguments` (this module imports it
only inside its functions, so either can be imported first).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import attrs

from uffd_aio.serve_options import ServeOptions, add_arguments

if TYPE_CHECKING:
    from uffd_aio.server import ClientInfo, HandoffServer

__all__ = ["add_arguments", "main", "start_metrics"]


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
    from uffd_aio.server import ServerStats

    snap: tuple[list[ClientInfo], ServerStats] = ([], ServerStats())

    def refresh() -> None:  # on the loop thread; the HTTP thread only reads the snapshot
        nonlocal snap
        with lock:
            snap = (server.clients, attrs.evolve(server.stats))
        server.call_later_while_open(1.0, refresh)

    class Collector:
        def collect(self) -> Iterator[object]:
            with lock:
                clients, st = list(snap[0]), snap[1]
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
            yield CounterMetricFamily("uffd_aio_native_faults",
                                      "faults resolved in C by the native engine",
                                      value=st.native_faults
                                      + sum(c.native_faults for c in clients))
            yield CounterMetricFamily("uffd_aio_python_faults",
                                      "faults seen by Python (handlers, policies)",
                                      value=st.python_faults
                                      + sum(c.python_faults for c in clients))
            g = GaugeMetricFamily("uffd_aio_client_faults", "faults per live client",
                                  labels=["client", "pid"])
            for c in clients:
                g.add_metric([str(c.id), str(c.pid)], c.faults)
            yield g
            g = GaugeMetricFamily("uffd_aio_client_native_faults",
                                  "faults per live client resolved by the native engine",
                                  labels=["client", "pid", "path"])
            for c in clients:
                g.add_metric([str(c.id), str(c.pid), c.path], c.native_faults)
            yield g

    registry = CollectorRegistry()  # our own: no process/platform noise, no global state
    registry.register(Collector())  # type: ignore[arg-type, unused-ignore]
    start_http_server(port, addr=addr, registry=registry)
    refresh()
    return True


# ---- the subcommand ---------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    from uffd_aio.server import HandoffServer
    from uffd_aio.stores import open_backend

    try:
        opts = ServeOptions.from_args(args)  # a bad --readahead fails here, not per client
    except ValueError as exc:
        print(f"uffd-aio serve: {exc}", file=sys.stderr)
        return 2
    try:
        backend = await open_backend(args.backend)
    except Exception as exc:
        print(f"uffd-aio serve: cannot open backend {args.backend!r}: {exc}", file=sys.stderr)
        return 2
    try:
        server = HandoffServer(args.socket, backend, options=opts, close_backend=True)
    except (OSError, ValueError) as exc:
        await backend.aclose()
        print(f"uffd-aio serve: {exc}", file=sys.stderr)
        return 2
    try:
        await server.start()
    except (OSError, ValueError) as exc:
        await backend.aclose()
        what = "cannot take over" if args.takeover else f"cannot listen on {args.socket}"
        print(f"uffd-aio serve: {what}: {exc}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    closing: list[asyncio.Task[None]] = []  # a reference keeps the task alive
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: closing.append(loop.create_task(server.aclose())))
    if args.metrics_port is not None:
        start_metrics(server, args.metrics_port)
    rec = server.recovery
    print(f"uffd-aio serve: listening on {args.socket}, backend {backend.name}"
          + (f", {rec.how}: {rec.adopted} clients served again, {rec.dropped} gone, "
             f"{rec.rejected} state files rejected, {rec.lost} lost" if rec else ""),
          file=sys.stderr, flush=True)
    if os.environ.get("NOTIFY_SOCKET"):
        from uffd_aio.fdkeeper import sd_notify

        sd_notify("READY=1")
    try:
        await server.serve_forever()
    except Exception as exc:  # fatal: clients were killed (--on-fatal kill-clients) or wait
        print(f"uffd-aio serve: fatal: {type(exc).__name__}: {exc}", file=sys.stderr)
        await server.aclose()
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    if args.loop == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_serve(args))
