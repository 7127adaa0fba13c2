"""ASGI plumbing for the lean app: request headers, the body with a size limit, plain responses,
and the client-disconnect watcher."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ProxyError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


@dataclass(slots=True)
class RequestHeaders:
    """The few request headers the data path reads (names are lower-case in ASGI)."""

    authorization: bytes | None = None
    request_id: str | None = None
    content_length: int | None = None
    routing: dict[str, str] = field(default_factory=dict)  # x-session-id, x-user-id

    @classmethod
    def parse(cls, raw: list[tuple[bytes, bytes]]) -> RequestHeaders:
        headers = cls()
        for name, value in raw:
            if name == b"authorization":
                headers.authorization = value
            elif name == b"x-request-id":
                headers.request_id = value.decode("latin-1")[:200]
            elif name == b"content-length":
                with contextlib.suppress(ValueError):
                    headers.content_length = int(value)
            elif name == b"x-session-id" or name == b"x-user-id":
                headers.routing[name.decode()] = value.decode("latin-1")
        return headers


async def read_body(receive: Receive, limit: int, content_length: int | None) -> bytes:
    """The whole request body, or a 413 ``ProxyError`` as soon as it exceeds ``limit`` bytes."""
    if content_length is not None and content_length > limit:
        raise _too_large(limit)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > limit:
            raise _too_large(limit)
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"The request body exceeds the limit of {limit} bytes.", "request_too_large")


async def send_bytes(
    send: Send, status: int, body: bytes, *, content_type: bytes = JSON, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: ProxyError, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await send_bytes(send, error.status, error.json_bytes(), extra=extra)


# The watcher starts this long after the request: answers faster than that never pay for the extra
# task (a measurable share of the per-request CPU budget). A client that left in the meantime is
# seen as soon as the watcher starts, because the server reports a past disconnect immediately.
WATCH_DELAY = 0.02


class DisconnectWatcher:
    """Cancels the request's task when the client disconnects, so the upstream call is abandoned
    promptly: while waiting for the engine's headers, its first token, or in the middle of a stream.

    Uvicorn silently drops writes to a closed connection, so without this a proxied generation
    would run to completion for nobody. Call ``finish()`` before the final write so a disconnect
    notice that only reports the completed response does not cancel anything, and ``close()`` at
    the end.
    """

    __slots__ = ("_done", "_receive", "_task", "_timer", "_watch", "client_gone")

    def __init__(self, receive: Receive, delay: float = WATCH_DELAY) -> None:
        self.client_gone = False
        self._done = False
        self._receive = receive
        self._task = asyncio.current_task()
        self._watch: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        self._timer = None
        if not self._done:
            self._watch = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if not self._done and self._task is not None:
                    self.client_gone = True
                    self._task.cancel()
                return

    def finish(self) -> None:
        self._done = True

    def close(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        if self._watch is not None:
            self._watch.cancel()
