"""One answer of an engine, as ``proxy.httpclient.connections.Connection`` parses it: the status and
headers at once, the body whole or as it arrives."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from .connections import Connection


class Response:
    """One answer: ``status``, ``headers``, ``content_type``, then ``read()`` or ``content``.

    Nothing in it refers back to it (its body reader is itself, not an object holding it): an
    answer is freed the moment its request is done with it, never left to the cyclic garbage
    collector with its bytes (five objects per request that the collector had to find, and most
    of what its collections cost on the data path)."""

    __slots__ = ("_conn", "_error", "_waiter", "chunks", "complete", "parts", "raw_headers", "size", "status")

    def __init__(self, conn: Connection, status: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self._conn: Connection | None = conn
        self.status = status
        self.raw_headers = raw_headers
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.parts = 0  # pieces of the body the parser handed over: about one per event of a stream
        self.complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def content(self) -> Response:
        """The body as it arrives (what relays use of aiohttp's ``StreamReader``: ``readany``, ``iter_any``)."""
        return self

    async def readany(self) -> bytes:
        """What came of the body since the last call, waiting for something; b"" at its end."""
        while not self.chunks:
            if self.complete:
                self.close()
                return b""
            await self._wait()
        # All that came: an engine's events, a chunk each, cost one write to the client (docs/architecture.md).
        chunk = b"".join(self.chunks)
        self.chunks.clear()
        self.size = 0
        if self._conn is not None and self._conn.paused:
            self._conn.resume()
        return chunk

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk

    def header(self, name: bytes, default: bytes = b"") -> bytes:
        """The value of the header ``name`` (lower case) as sent, or ``default``."""
        for key, value in self.raw_headers:
            if key.lower() == name:
                return value
        return default

    @property
    def content_type(self) -> str:
        """The media type without parameters, lower case (aiohttp's ``content_type``)."""
        raw = self.header(b"content-type", b"application/octet-stream")
        return raw.split(b";", 1)[0].strip().lower().decode("latin-1")

    def until_closed(self) -> bool:
        """Whether the body is delimited by the end of the connection (no length, not chunked)."""
        names = {name.lower() for name, _ in self.raw_headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    async def read(self) -> bytes:
        while not self.complete:
            await self._wait()
        body = b"".join(self.chunks)
        self.chunks.clear()
        self.close()
        return body

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        conn = self._conn
        if conn is None:
            raise aiohttp.ClientPayloadError("The response was closed before its body was read.")
        self._waiter = conn.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None and not self.chunks:
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """Done with the answer: its connection is reused if it was read whole, else closed. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finished(self, reusable=self.complete)
