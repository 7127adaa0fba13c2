"""The lowest floor in ``make bench FLOORS=1``: a passthrough with no ASGI server and no features.

An asyncio protocol parses each request with httptools (uvicorn's parser), forwards its body to
the engine named for its model (``FLOOR_UPSTREAMS="model=url,..."``, as bench/floor_app.py) through
RouterPanel's own HTTP client (``proxy.httpclient``) and writes the answer back with one ``write``
(a stream: one chunk per piece the engine sent). What is left is the kernel's work on two sockets,
the event loop, a JSON parse and two HTTP parses: the cost of an extra hop in Python on this
machine. ``FLOOR_PORT`` is the port to listen on.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import cast

import httptools
import uvloop

from proxy.httpclient import Pool

UPSTREAMS = dict(item.split("=", 1) for item in os.environ.get("FLOOR_UPSTREAMS", "").split(",") if item)


class Passthrough(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.url = b""
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        task = asyncio.ensure_future(self.answer(self.url.decode(), body))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def answer(self, path: str, body: bytes) -> None:
        transport = self.transport
        assert transport is not None
        headers = {"Content-Type": "application/json"}
        upstream = UPSTREAMS[json.loads(body)["model"]]
        response = await self.pool.request("POST", upstream + path, body, headers, connect=5.0, total=60.0)
        kind = response.header(b"content-type", b"application/json")
        if response.content_type == "text/event-stream":
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n" % kind)
            async for chunk in response.content.iter_any():
                transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            transport.write(b"0\r\n\r\n")
        else:
            data = await response.read()
            head = b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n" % (
                response.status,
                kind,
                len(data),
            )
            transport.write(head + data)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    pool = Pool(loop, 0)
    server = await loop.create_server(lambda: Passthrough(pool), "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(os.environ["FLOOR_PORT"])))
