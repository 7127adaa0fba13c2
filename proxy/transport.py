"""ASGI plumbing for the lean app: request headers, the body with a size limit, plain responses,
and the client-disconnect watcher."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from .errors import ProxyError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"
# On every /v1 response (JSON, errors, SSE: ``proxy.sse.STREAM_HEADERS`` carries it too): a browser
# never sniffs an answer into something else (HTML from an engine's error text, say). A constant
# tuple costs about 0.5 µs per response in uvicorn's header checks.
NOSNIFF = (b"x-content-type-options", b"nosniff")


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


# The request headers ``RequestHeaders.parse`` reads.
_READ = frozenset(
    (
        b"authorization",
        b"x-request-id",
        b"content-length",
        b"x-session-id",
        b"x-user-id",
        b"x-routerpanel-hop",
        b"x-routerpanel-explain",
    )
)


@dataclass(slots=True)
class RequestHeaders:
    """The few request headers the data path reads (names are lower-case in ASGI)."""

    authorization: bytes | None = None
    request_id: str | None = None
    hops: bytes | None = None  # x-routerpanel-hop: the RouterPanel deployments it went through
    content_length: int | None = None
    routing: dict[str, str] | None = None  # x-session-id, x-user-id (None: neither was sent)
    explain: bool = False  # x-routerpanel-explain: 1, the client wants the explanation's summary

    @classmethod
    def parse(cls, raw: list[tuple[bytes, bytes]]) -> RequestHeaders:
        headers = cls()
        for name, value in raw:
            # Most of a client's headers are none of these (an SDK sends a dozen or more): one set
            # lookup passes each over, where the comparisons below would each be tried in turn.
            if name not in _READ:
                continue
            if name == b"authorization":
                headers.authorization = value
            elif name == b"x-request-id":
                headers.request_id = value.decode("latin-1")[:200]
            elif name == b"content-length":
                try:  # noqa: SIM105 - contextlib.suppress costs three calls per request
                    headers.content_length = int(value)
                except ValueError:
                    pass
            elif name == b"x-session-id" or name == b"x-user-id":
                if headers.routing is None:
                    headers.routing = {}
                headers.routing[name.decode()] = value.decode("latin-1")
            elif name == b"x-routerpanel-hop":
                headers.hops = value
            elif name == b"x-routerpanel-explain":
                headers.explain = value.strip() == b"1"
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
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), NOSNIFF]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: ProxyError, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await send_bytes(send, error.status, error.json_bytes(), extra=extra)


# A request's disconnect watcher starts once the request is this old: answers faster than that never
# pay for the extra task (a measurable share of the per-request CPU budget). A client that left in
# the meantime is seen as soon as its watcher starts, because the server reports a past disconnect
# immediately.
WATCH_DELAY = 0.02


class _WatchScheduler:
    """One task per event loop that starts the watchers of requests older than ``WATCH_DELAY``.

    A per-request timer would cost more than the watcher it saves under uvloop; instead requests
    register in an insertion-ordered dict (oldest first) and this task sweeps it every tick.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: dict[DisconnectWatcher, float] = {}
        self.task = loop.create_task(self._run(), name="routerpanel-disconnect-watchers")

    async def _run(self) -> None:
        pending = self.pending
        while True:
            await asyncio.sleep(WATCH_DELAY)
            if not pending:
                continue
            due = time.monotonic() - WATCH_DELAY
            ready = []
            for watcher, registered in pending.items():
                if registered > due:
                    break
                ready.append(watcher)
            for watcher in ready:
                del pending[watcher]
                watcher.start()


_scheduler: _WatchScheduler | None = None


def _scheduler_for(loop: asyncio.AbstractEventLoop) -> _WatchScheduler:
    global _scheduler
    if _scheduler is None or _scheduler.loop is not loop or _scheduler.task.done():
        _scheduler = _WatchScheduler(loop)
    return _scheduler


class DisconnectWatcher:
    """Cancels the request's task when the client disconnects, so the upstream call is abandoned
    promptly: while waiting for the engine's headers, its first token, or in the middle of a stream.

    Uvicorn silently drops writes to a closed connection, so without this a proxied generation
    would run to completion for nobody. Call ``finish()`` before the final write so a disconnect
    notice that only reports the completed response does not cancel anything, and ``close()`` at
    the end.
    """

    __slots__ = ("_done", "_receive", "_scheduler", "_task", "_watch", "client_gone")

    def __init__(self, receive: Receive, loop: asyncio.AbstractEventLoop) -> None:
        """``loop`` is the running loop (the caller's: see ``proxy.upstream.engines``)."""
        self.client_gone = False
        self._done = False
        self._receive = receive
        self._task = asyncio.current_task(loop)
        self._watch: asyncio.Future | None = None
        self._scheduler = _scheduler_for(loop)
        self._scheduler.pending[self] = time.monotonic()

    def start(self) -> None:
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
        self._scheduler.pending.pop(self, None)
        if self._watch is not None:
            self._watch.cancel()
            # The cancelled task keeps its CancelledError, whose traceback holds ``_run``'s frame and
            # so this watcher: dropping the task here leaves no cycle for the garbage collector.
            self._watch = None
