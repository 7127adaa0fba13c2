"""The connections to engines (an httptools parser each) and the pool that reuses them."""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable
from functools import lru_cache

import aiohttp
import httptools

from ..writes import outgoing
from .response import Response

IDLE_SECONDS = 15.0  # a kept-alive connection idle longer is closed rather than reused
PAUSE_AT = 256 * 1024  # bytes of a streamed answer buffered before reading from the engine pauses


@lru_cache(maxsize=4096)
def _split(url: str) -> tuple[tuple[str, int, bool], bytes, bytes]:
    """(host, port, TLS), the ``Host`` header value and the request target of ``http[s]://host[:port]/path``."""
    tls = url.startswith("https://")
    if not tls and not url.startswith("http://"):
        raise aiohttp.InvalidURL(url)
    authority, _, path = url[8 if tls else 7 :].partition("/")
    host, port = authority, 443 if tls else 80
    if authority.rfind(":") > authority.rfind("]"):  # a port, and not a colon inside [IPv6]
        host, _, number = authority.rpartition(":")
        port = int(number)
    return (host.strip("[]"), port, tls), authority.encode("idna"), ("/" + path).encode()


@lru_cache(maxsize=1)
def _tls() -> ssl.SSLContext:
    return ssl.create_default_context()  # certificates verified, as aiohttp does by default


class Connection(asyncio.Protocol):
    """One connection to an engine and the httptools parser of its answers."""

    def __init__(self, pool: Pool, key: tuple[str, int, bool]) -> None:
        self.pool = pool
        self.key = key
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.head: list[tuple[bytes, bytes]] = []
        self.head_waiter: asyncio.Future[Response] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.reused = False  # it served an earlier request: the engine may have closed it meanwhile
        self.idle_since = 0.0
        self.lost = False
        self.keep_alive = False

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(aiohttp.ClientPayloadError(f"The engine's answer is not valid HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.forget(self)
        response = self.response
        if response is not None and not response.complete and response.until_closed():
            response.complete = True  # an answer with neither a length nor chunks ends with its connection
            response._wake()
        elif self.head_waiter is not None or (response is not None and not response.complete):
            self.fail(None)

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head.append((name, value))

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # the parser forgets it once the answer ends
        response = self.response = Response(self, self.parser.get_status_code(), self.head)
        self.head = []
        waiter, self.head_waiter = self.head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None:
            response.chunks.append(body)
            response.size += len(body)
            response.parts += 1
            if response.size > PAUSE_AT and not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()
            response._wake()

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None:
            response.complete = True
            response._wake()
        self._disarm()

    # -- the request -------------------------------------------------------------------------------

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    def fail(self, error: BaseException | None) -> None:
        """The connection broke (or timed out): wake whoever waits on it with ``error``."""
        self._disarm()
        waiter, self.head_waiter = self.head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error or aiohttp.ServerDisconnectedError())
        response = self.response
        if response is not None and not response.complete:
            response._error = error or aiohttp.ClientPayloadError("The engine closed the connection mid-answer.")
            response._wake()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Give up on the request in flight: the connection is closed, never reused."""
        self._disarm()
        self.head_waiter = None
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()

    def _expired(self) -> None:
        self.timer = None
        self.fail(TimeoutError())

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def send(self, data: bytes, total: float | None) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.response = None
        self.head_waiter = waiter = self.loop.create_future()
        if total:
            self.timer = self.loop.call_at(self.loop.time() + total, self._expired)
        self.pool.outgoing.write(self.transport, data)
        return waiter

    def finished(self, response: Response, *, reusable: bool) -> None:
        if self.response is response:
            self.response = None
        self._disarm()
        if reusable and not self.lost and self.keep_alive and not self.paused:
            self.reused = True
            self.idle_since = self.loop.time()
            self.pool.put(self)
        else:
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()


class Pool:
    """This event loop's connections to engines: idle ones per (host, port), reused newest first,
    at most ``limit`` open at once (0: no limit); requests wait for a free slot past it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.loop = loop
        self.limit = limit
        self.idle: dict[tuple[str, int, bool], list[Connection]] = {}
        self.open: set[Connection] = set()
        self.slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.closed = False
        self.outgoing = outgoing(loop)  # requests are written at the loop's next turn (``proxy.writes``)

    def put(self, conn: Connection) -> None:
        self.idle.setdefault(conn.key, []).append(conn)
        self._free_slot()

    def forget(self, conn: Connection) -> None:
        if conn in self.open:
            self.open.discard(conn)
            idle = self.idle.get(conn.key)
            if idle and conn in idle:
                idle.remove(conn)
            self._free_slot()

    def _free_slot(self) -> None:
        while self.slot_waiters:
            waiter = self.slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _idle(self, key: tuple[str, int, bool]) -> Connection | None:
        """A kept-alive connection to ``key`` still fit for a request (closing the stale ones)."""
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.lost and self.loop.time() - conn.idle_since < IDLE_SECONDS:
                return conn
            self.forget(conn)
            if conn.transport is not None:
                conn.transport.close()
        return None

    async def _connection(self, key: tuple[str, int, bool], connect: float | None) -> Connection:
        conn = self._idle(key)
        if conn is not None:
            return conn
        while self.limit and len(self.open) >= self.limit and not self._close_an_idle_one():
            waiter = self.loop.create_future()
            self.slot_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._free_slot()  # it was handed a slot it will not use: the next waiter's
                raise
            conn = self._idle(key)
            if conn is not None:
                return conn
        conn = Connection(self, key)
        self.open.add(conn)
        try:
            async with asyncio.timeout(connect):
                tls = _tls() if key[2] else None
                await self.loop.create_connection(lambda: conn, key[0], key[1], ssl=tls)
        except TimeoutError:
            self.forget(conn)
            raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host http://{key[0]}:{key[1]}") from None
        except OSError as exc:
            self.forget(conn)
            message = f"Cannot connect to host {key[0]}:{key[1]} [{exc.strerror}]"
            raise aiohttp.ClientOSError(exc.errno, message) from None
        except BaseException:
            self.forget(conn)
            raise
        return conn

    def _close_an_idle_one(self) -> bool:
        for idle in self.idle.values():
            if idle:
                conn = idle.pop(0)
                self.forget(conn)
                if conn.transport is not None:
                    conn.transport.close()
                return True
        return False

    async def request(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: dict[str, str],
        *,
        connect: float | None,
        total: float | None,
        sent: Callable[[], None] | None = None,
    ) -> Response:
        """``method`` ``url`` with ``body`` (None: none, no ``Content-Length``); the answer once its head came.
        ``sent`` is called once the request is written, or before anything else can run on the loop
        (a connection is waited for or opened first), whichever is first."""
        key, authority, target = _split(url)
        lines = "\r\n".join(map(": ".join, headers.items())) + "\r\n" if headers else ""  # no comprehension's frame
        if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
            raise ValueError("A header name or value holds a line break.")
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode("ascii"), target, authority)
        if body is None:
            data = b"%s%s\r\n" % (head, lines.encode("latin-1"))
        else:
            data = b"%sContent-Length: %d\r\n%s\r\n%s" % (head, len(body), lines.encode("latin-1"), body)
        conn = self._idle(key)
        if conn is None:
            if sent is not None:
                sent()
                sent = None
            conn = await self._connection(key, connect)
        try:
            answer = conn.send(data, total)
            if sent is not None:
                sent()
            return await answer
        except aiohttp.ServerDisconnectedError:
            if not conn.reused:
                raise
        except BaseException:  # cancelled (the client left, the node was ejected) or timed out
            conn.abort()
            raise
        # A kept-alive connection the engine closed while it was idle: once more on a new one.
        conn = await self._fresh(key, connect)
        try:
            return await conn.send(data, total)
        except BaseException:
            conn.abort()
            raise

    async def _fresh(self, key: tuple[str, int, bool], connect: float | None) -> Connection:
        for conn in self.idle.pop(key, []):
            self.forget(conn)
            if conn.transport is not None:
                conn.transport.close()
        return await self._connection(key, connect)

    def close(self) -> None:
        self.closed = True
        for conn in list(self.open):
            if conn.transport is not None:
                conn.transport.close()
        self.open.clear()
        self.idle.clear()
