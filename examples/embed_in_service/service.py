"""Embedding a pager in an asyncio service you already have.

A tiny HTTP service owns a large "table" that is paged in lazily from a
store on first use.  The pager shares the service's event loop: no thread
of its own, no extra process.  Requests read the table from a worker thread
(native code, GIL released: docs/gil.md), so faults are served while the
service keeps answering.

    python examples/embed_in_service/service.py               # serve on :8080
    python examples/embed_in_service/service.py --self-test   # start, query, check, exit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

import uffd_aio
from uffd_aio import testing
from uffd_aio.cli import configure_logging

TABLE = 64 << 20  # 64 MiB, faulted in on demand


class Store:
    """Stand-in for a slow remote store: content is a function of the offset."""

    async def fetch(self, offset: int, length: int) -> bytes:
        await asyncio.sleep(0)  # a real store would await the network here
        return bytes(testing.pattern_bytes(offset, length))


async def handle(pager: uffd_aio.Pager, table: uffd_aio.Region,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = (await reader.readline()).decode().split()
    while (await reader.readline()).strip():  # skip headers
        pass
    path = request[1] if len(request) > 1 else "/"
    if path.startswith("/check/"):
        page = int(path.removeprefix("/check/"))
        offset = page * table.page_size
        # Native read in a worker thread: faults are served on this loop meanwhile.
        bad = await testing.verify(table.address + offset, table.page_size, offset)
        body = {"page": page, "ok": bad < 0}
    else:
        st = pager.stats
        body = {"faults": st.faults, "resolved_bytes": st.resolved_bytes,
                "p50_us": round(st.latency.p50_us, 1)}
    data = json.dumps(body).encode()
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    await writer.drain()
    writer.close()


async def get(port: int, path: str) -> dict[str, object]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    return dict(json.loads(raw.split(b"\r\n\r\n", 1)[1]))


async def main(port: int, self_test: bool) -> int:
    store = Store()
    async with uffd_aio.Pager(name="service") as pager:   # joins the running loop
        table = pager.map(TABLE)

        @table.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> bytes:
            return await store.fetch(ev.offset, ev.page_size)

        server = await asyncio.start_server(
            lambda r, w: handle(pager, table, r, w), "127.0.0.1", port)
        port = server.sockets[0].getsockname()[1]
        async with server:
            if not self_test:
                print(f"serving on http://127.0.0.1:{port}/ (try /check/1234 and /stats)")
                await server.serve_forever()
                return 0
            pages = [0, 1, 4095, 16383]
            results = await asyncio.gather(*(get(port, f"/check/{p}") for p in pages))
            stats = await get(port, "/stats")
            print("checks:", results)
            print("stats:", stats)
            return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--self-test", action="store_true", help="query a random port, then exit")
    args = ap.parse_args()
    configure_logging(0)  # an application configures structlog; the library never does
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(asyncio.run(main(0 if args.self_test else args.port, args.self_test)))
