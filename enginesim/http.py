"""A small, fast HTTP/1.1 server on asyncio protocols with httptools parsing.

The fast mode is the benchmark's DIRECT baseline, so it must cost little: for the same cached answer
aiohttp.web spends about 4x and a raw ASGI app under uvicorn about 3x the CPU per request of this server
(docs/decisions/0007-engine-simulator-own-http-server.md). Requests are parsed with httptools, served
with keep-alive, and an application may answer from precomputed bytes without creating a task
(``App.handle_fast``). Everything else runs as one task per request; when the client goes away,
``connection_lost`` cancels that task so the application sees ``CancelledError`` exactly where it was
waiting (in a TTFT sleep, a hang, between stream chunks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any, Protocol, cast
from urllib.parse import parse_qs

import httptools

logger = logging.getLogger("enginesim")

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_COMPACT_ASCII = json.JSONEncoder(separators=(",", ":"))  # ``json.dumps(obj, separators=...)``, made once
STREAM_HEADERS = (
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("transfer-encoding", "chunked"),
)


class ClientGone(Exception):
    """The client closed the connection before the response was complete."""


class Request:
    """One parsed request. ``headers`` keeps the raw (name, value) pairs in arrival order."""

    __slots__ = ("_json", "body", "headers", "keep_alive", "method", "path", "query")

    def __init__(
        self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool
    ) -> None:
        self.method = method.decode("latin-1")
        path, _, query = url.partition(b"?")
        self.path = path.decode("latin-1")
        self.query = query.decode("latin-1")
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower().encode("latin-1")
        value = None
        for key, val in self.headers:
            if key.lower() == wanted:
                value = val.decode("latin-1")
        return value

    def query_params(self) -> dict[str, list[str]]:
        return parse_qs(self.query)


class App(Protocol):
    def handle_fast(self, request: Request) -> bytes | None: ...

    async def handle(self, request: Request, response: Response) -> None: ...


def render_head(status: int, headers: Iterable[tuple[str, str]], *, keep_alive: bool = True) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Unknown"))]
    lines.extend(f"{k}: {v}".encode("latin-1") for k, v in headers)
    if not keep_alive:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def render_response(
    status: int,
    body: bytes,
    content_type: str = "application/json",
    headers: Iterable[tuple[str, str]] = (),
    *,
    keep_alive: bool = True,
) -> bytes:
    """The full bytes of a response with a Content-Length body (what the fast mode caches)."""
    head = [("content-type", content_type), ("content-length", str(len(body))), *headers]
    return render_head(status, head, keep_alive=keep_alive) + body


class Response:
    """Writes one response on a connection: either whole (``send``) or as a chunked SSE stream."""

    __slots__ = ("_conn", "keep_alive", "started")

    def __init__(self, conn: HttpConnection, keep_alive: bool) -> None:
        self._conn = conn
        self.keep_alive = keep_alive
        self.started = False

    @property
    def gone(self) -> bool:
        return self._conn.closed

    def send(
        self, status: int, body: bytes, content_type: str = "application/json", headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        self._check()
        self.started = True
        self._conn.transport.write(render_response(status, body, content_type, headers, keep_alive=self.keep_alive))

    def send_json(self, status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send(status, _COMPACT_ASCII.encode(obj).encode(), headers=headers)

    def start_stream(self, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> None:
        self._check()
        self.started = True
        head = [*STREAM_HEADERS, *headers]
        self._conn.transport.write(render_head(status, head, keep_alive=self.keep_alive))

    def write(self, data: bytes) -> None:
        """Send one chunk of a stream (an empty ``data`` is ignored: it would end the stream)."""
        self._check()
        if data:
            self._conn.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_stream(self) -> None:
        self._check()
        self._conn.transport.write(b"0\r\n\r\n")

    async def drain(self) -> None:
        """Wait while the client reads slower than we write (the transport paused us)."""
        await self._conn.drain()

    def abort(self) -> None:
        """Drop the connection without finishing the response (a crashed or broken engine)."""
        self._conn.transport.abort()

    def _check(self) -> None:
        if self._conn.closed:
            raise ClientGone()


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests and serves them in order (pipelined ones queue up)."""

    def __init__(self, app: App, connections: set[HttpConnection]) -> None:
        self.app = app
        self.connections = connections
        self.transport: asyncio.Transport  # set by connection_made, before anything reads it
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.task: asyncio.Task | None = None
        self.pending: deque[Request] = deque()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._paused: asyncio.Future | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream server's transport is one
        self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.connections.discard(self)
        if self.task is not None:
            self.task.cancel()
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)

    def pause_writing(self) -> None:
        if self._paused is None or self._paused.done():
            self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)

    async def drain(self) -> None:
        if self._paused is not None and not self._paused.done():
            await self._paused
        if self.closed:
            raise ClientGone()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, b"upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, str(exc).encode())

    def _fail(self, status: int, message: bytes) -> None:
        if not self.closed:
            self.transport.write(render_response(status, message, "text/plain", keep_alive=False))
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits 1 s for it on large bodies

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        request = Request(
            self.parser.get_method(), self._url, self._headers, b"".join(self._body), self.parser.should_keep_alive()
        )
        if self.task is not None or self.pending:
            self.pending.append(request)
        else:
            self._dispatch(request)

    def _dispatch(self, request: Request) -> None:
        fast = self.app.handle_fast(request)
        if fast is not None:
            self.transport.write(fast)
            if not request.keep_alive:
                self.transport.close()
            return
        self.task = asyncio.get_running_loop().create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        response = Response(self, request.keep_alive)
        try:
            await self.app.handle(request, response)
        except (asyncio.CancelledError, ClientGone):
            pass
        except Exception:
            logger.exception("unhandled error serving %s %s", request.method, request.path)
            if not response.started and not self.closed:
                with contextlib.suppress(ClientGone):
                    response.send_json(500, {"error": {"message": "simulator error", "type": "server_error"}})
        finally:
            self.task = None
            if not self.closed:
                if not request.keep_alive:
                    self.transport.close()
                elif self.pending:
                    self._dispatch(self.pending.popleft())


class HttpServer:
    """A listening socket serving ``app``; it can stop and resume accepting (the refuse-connections fault)."""

    def __init__(self, app: App, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.connections: set[HttpConnection] = set()
        self._server: asyncio.Server | None = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self.app, self.connections), self.host, self.port, reuse_address=True, backlog=2048
        )

    def stop_listening(self) -> None:
        """Close the listening socket: new connections are refused, open ones keep being served."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def close(self) -> None:
        self.stop_listening()
        for conn in list(self.connections):
            conn.transport.close()
