"""The HTTP edge: uvicorn's httptools protocol with a bounded request head, read timeouts and a
drained graceful shutdown.

Selected with ``uvicorn ... --http routerpanel.httpedge:GuardedHttpToolsProtocol`` (the Procfile,
docs/deployment.md, ``make bench`` and the end-to-end tests do). It subclasses uvicorn's
``HttpToolsProtocol`` and calls the base class for all the HTTP work; what it adds:

- **A bound on the request head** (request line and headers, ``ROUTERPANEL_HTTP_MAX_HEAD_BYTES``,
  64 KiB). httptools joins the pieces of a header value that spans several reads with ``bytes +=``
  (a full copy per read: quadratic) and nothing in httptools or uvicorn bounds a head, so one
  96 MiB header made about 20 GB of copies inside the event loop and stalled every other request
  for seconds. Here the bytes of a head still incomplete after a read are counted; past the bound
  the client gets ``431 Request Header Fields Too Large`` and the parser never sees another byte of
  that connection (an attacker can make it copy at most the bound plus one read). A head that
  arrives whole inside one read bigger than the bound is measured as parsed.
- **A head timeout** (``ROUTERPANEL_HTTP_HEAD_TIMEOUT``, 10 s): a request head must be complete
  within this many seconds of its first byte (of the connection opening, for the first request).
  A slow head gets ``408 Request Timeout``; a connection that never sent a byte is closed.
- **A body timeout** (``ROUTERPANEL_HTTP_BODY_TIMEOUT``, 10 s without a body byte) and a **body
  deadline** (``ROUTERPANEL_HTTP_BODY_DEADLINE``, 60 s for the whole body; 0 turns either off):
  ``408`` and close. Time during which the server is not reading (flow control paused because the
  application is not consuming, or an ``Expect: 100-continue`` not answered yet) does not count.
- **A lane for the data path**: a request for ``/v1/*`` goes straight to the proxy app, without
  uvicorn's generic per-request work (``routerpanel.proxylane``). Its answers and stream chunks
  wait for the event loop's next turn (``proxy.writes``); bytes arriving on the connection, or a
  shutdown, write what waits first, so nothing overtakes it.
- **One keep-alive timer per connection**: uvicorn arms a timer after every response and the next
  request cancels it (about 2.5 µs a request). Here it stays armed while the connection is in use;
  when it fires it closes the connection only if no request came since the last response for
  ``--timeout-keep-alive`` seconds, and otherwise waits for the rest of that time.
- **Named request tasks** (``routerpanel.proxylane.start_task``).
- **A drained graceful shutdown** (``ROUTERPANEL_HTTP_SHUTDOWN_DRAIN``, 1 s): uvicorn's shutdown
  closes an idle keep-alive connection at once, which resets a request already on the wire (up to
  29 lost per rolling restart under load, measured). Here an idle connection stays open that long;
  a request arriving meanwhile is served with ``connection: close`` and the client reconnects (to
  the sibling worker in a rolling restart).

Cost on the hot path (a request that arrives whole in one read): no timer, one assignment and a
direct base-class call in three callbacks (about 0.6 µs per request). The guard is one
``call_later`` per connection (cancelled when its first request is complete) plus one per request
that straddles reads; the body timer is lazy (a read records the time, the timer compares).

After a 431 or 408 the connection is half-closed and the client's further input is read and
dropped (at most 1 MiB, for at most 1 s) so the client reads the answer rather than a reset.
Rejections are logged at most once per 10 s: a full log pipe blocks the process, so a warning per
rejection would be another way to stall it. This module is loaded by uvicorn before Django and
reads its settings from the environment itself; it imports nothing of Django's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.writes import outgoing
from routerpanel.proxylane import lane_for, start_in_lane, start_task

__all__ = ["GuardedHttpToolsProtocol", "settings_from_environment"]

_base = HttpToolsProtocol  # per-request callbacks call it directly: cheaper than super() there

NOSNIFF = b"x-content-type-options: nosniff\r\n"
LINGER_SECONDS = 1.0
LINGER_BYTES = 1024 * 1024
LOG_EVERY = 10.0  # seconds: at most one rejection warning per window


def _number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number.") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r} must be at least 0.")
    return value


def settings_from_environment() -> dict[str, float]:
    """The edge's settings (``ROUTERPANEL_HTTP_*``), validated; a bad value stops start-up."""
    return {
        "max_head_bytes": int(_number("ROUTERPANEL_HTTP_MAX_HEAD_BYTES", 64 * 1024)),
        "head_timeout": _number("ROUTERPANEL_HTTP_HEAD_TIMEOUT", 10.0),
        "body_timeout": _number("ROUTERPANEL_HTTP_BODY_TIMEOUT", 10.0),
        "body_deadline": _number("ROUTERPANEL_HTTP_BODY_DEADLINE", 60.0),
        "shutdown_drain": _number("ROUTERPANEL_HTTP_SHUTDOWN_DRAIN", 1.0),
    }


_SETTINGS = settings_from_environment()

# Where the connection is in the request it is reading.
_BETWEEN = 0  # no request started since the last one was read whole (the app may still be answering)
_HEAD = 1  # request line or headers incomplete
_BODY = 2  # head complete, body incomplete

# What the connection's one timer is for.
_FIRST, _HEAD_DUE, _BODY_DUE, _DRAIN, _LINGER = range(5)

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class _RejectionLog:
    """Rate-limited warnings about rejected connections (hostile clients cannot flood the log)."""

    at = -1e9
    suppressed = 0

    @classmethod
    def report(cls, logger: logging.Logger, status: int, client: object) -> None:
        now = time.monotonic()
        if now - cls.at < LOG_EVERY:
            cls.suppressed += 1
            return
        more = f" (and {cls.suppressed} more since the last report)" if cls.suppressed else ""
        logger.warning("Answered %d %s to %s and closed%s.", status, _REASONS[status].decode(), client, more)
        cls.at, cls.suppressed = now, 0


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head over the bound."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = int(_SETTINGS["max_head_bytes"])
    head_timeout = _SETTINGS["head_timeout"]
    body_timeout = _SETTINGS["body_timeout"]
    body_deadline = _SETTINGS["body_deadline"]
    shutdown_drain = _SETTINGS["shutdown_drain"]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._phase = _BETWEEN
        self._completed_in_read = False  # a request ended inside the current read
        self._read_size = 0  # bytes in the current read
        self._head_bytes = 0  # bytes of the current head in earlier reads
        self._too_large = False
        self._guard: asyncio.TimerHandle | None = None
        self._guard_kind = _FIRST
        self._body_started = 0.0
        self._body_progress = 0.0
        self._draining = False  # the server is shutting down: the next response is the last
        self._rejected = False  # answered 431 or 408: only discarding input from now on
        self._discarded = 0
        self._lane = lane_for(config, self.access_log)  # the proxy app's, for /v1/* (routerpanel.proxylane)
        self._idle_from = 0.0  # when the last response completed (the keep-alive timer)
        self._outgoing = outgoing(self.loop)  # what the lane writes, waiting for the loop's next turn

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.head_timeout:
            # The first request head must be complete within head_timeout of the connection opening.
            self._arm(_FIRST, self.head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_keep_alive()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport in self._outgoing.pending:
            # The lane's last answer is still waiting for the loop's next turn (proxy.writes): it
            # goes first, before anything this read makes the server write (a 400, a pipelined answer).
            self._outgoing.flush_for(self.transport)
        if self._rejected:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self.transport.close()
            return
        self._completed_in_read = False
        self._read_size = len(data)
        _base.data_received(self, data)
        phase = self._phase
        if phase == _BETWEEN:
            # The hot path: every request so far arrived whole. Drop the connection's first guard
            # (or the shutdown drain: the request that arrived is served, then the connection closes).
            if self._guard is not None:
                self._disarm()
            return
        if self._rejected or self.transport.is_closing():  # answered 431 or 400 (parse error), or closed
            return
        if phase == _HEAD:
            # Every byte of this read belongs to the unfinished head unless a previous request ended
            # inside it (pipelining: the split is unknown, so the read is not counted; the bound may
            # be passed by one read at most, and is never enforced wrongly).
            if not self._completed_in_read:
                self._head_bytes += len(data)
                if self.max_head_bytes and self._head_bytes > self.max_head_bytes:
                    self._reject(431, b"The request head exceeds %d bytes.\n" % self.max_head_bytes)
                    return
            if self.head_timeout and (self._guard is None or self._guard_kind == _DRAIN):
                self._arm(_HEAD_DUE, self.head_timeout)
            return
        # phase == _BODY: the head is complete, the body is not.
        now = self.loop.time()
        self._body_progress = now
        if self._guard_kind != _BODY_DUE or self._guard is None:
            self._disarm()
            if self.body_timeout or self.body_deadline:
                self._body_started = now
                self._arm(_BODY_DUE, self._body_wait())

    def handle_websocket_upgrade(self) -> None:
        # The connection becomes a WebSocket: its own protocol owns the timeouts from here.
        self._disarm()
        self._stop_keep_alive()
        self._phase = _BETWEEN
        super().handle_websocket_upgrade()

    def shutdown(self) -> None:
        """Graceful shutdown (uvicorn calls this on every connection once it stopped accepting).

        A response in progress is the connection's last, as in uvicorn. A request being received is
        served, and is the last. An idle connection stays open ``shutdown_drain`` seconds so that a
        request already on its way is served rather than reset, then closes.
        """
        self._draining = True
        self._outgoing.flush_for(self.transport)  # an answer still waiting goes out before any close
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
        elif self._phase == _BETWEEN and not self._rejected:
            if self.shutdown_drain:
                self._disarm()
                self._arm(_DRAIN, self.shutdown_drain)
            else:
                self.transport.close()
        # _HEAD or _BODY: on_headers_complete marks the request as the last; its guard still runs.

    # -- httptools callbacks (each adds one assignment to uvicorn's own) --------------------------

    def on_message_begin(self) -> None:
        self._phase = _HEAD
        self._head_bytes = 0
        _base.on_message_begin(self)

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        if self.max_head_bytes and self._head_bytes + self._read_size > self.max_head_bytes:
            # A head that arrived in reads bigger than the bound (rare: big reads come with big
            # bodies) is measured as parsed; stopping the parser here makes uvicorn call
            # send_400_response, which answers 431 instead.
            # "METHOD URL HTTP/1.1\r\n", "name: value\r\n" per header, and the blank line.
            size = len(self.parser.get_method()) + len(self.url) + 14
            size += sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > self.max_head_bytes:
                self._too_large = True
                raise _HeadTooLarge
        lane = self._lane
        if lane is not None and self.url.startswith(lane.prefixes) and not self.parser.should_upgrade():
            start_in_lane(self, lane.app, self._outgoing)
        else:
            _base.on_headers_complete(self)
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        self._phase = _BETWEEN
        self._completed_in_read = True
        _base.on_message_complete(self)

    # -- keep-alive: one timer per connection, re-armed only when it fires --------------------------

    def on_response_complete(self) -> None:
        # uvicorn's, except for the keep-alive timer: uvicorn arms one after every response and the
        # next request cancels it (about 2.5 µs a request); here it stays armed while the connection
        # is in use, and when it fires it closes the connection only if it has been idle that long.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_from = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._keep_alive_due)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        start_task(self, cycle, app)  # uvicorn's, with the task named (routerpanel.proxylane)

    def _unset_keepalive_if_required(self) -> None:
        """uvicorn calls this on every read to cancel its keep-alive timer; this one stays armed."""

    def _stop_keep_alive(self) -> None:
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self._phase != _BETWEEN or (cycle is not None and not cycle.response_complete):
            return  # a request is in progress: its response arms the timer again
        idle = self.loop.time() - self._idle_from
        if idle >= self.timeout_keep_alive:
            self.transport.close()
        else:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive - idle, self._keep_alive_due)

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._reject(431, b"The request head exceeds %d bytes.\n" % self.max_head_bytes)
        else:
            super().send_400_response(msg)

    # -- the guard ---------------------------------------------------------------------------------

    def _arm(self, kind: int, delay: float) -> None:
        self._guard_kind = kind
        self._guard = self.loop.call_later(delay, self._on_guard)

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None

    def _body_wait(self) -> float:
        return min(w for w in (self.body_timeout, self.body_deadline) if w)

    def _on_guard(self) -> None:
        self._guard = None
        kind = self._guard_kind
        if kind == _LINGER:
            self.transport.close()
            return
        if self.transport.is_closing() or self._rejected:
            return
        cycle = self.cycle
        responding = cycle is not None and cycle.response_started and not cycle.response_complete
        phase = self._phase
        if phase == _BETWEEN:
            # The first guard of a connection that never sent a byte, or the end of a drain.
            if cycle is None or cycle.response_complete:
                self.transport.close()
            return
        if phase == _HEAD:
            if kind == _DRAIN:  # a request started arriving during the drain: give it the head timeout
                self._arm(_HEAD_DUE, self.head_timeout or 1.0)
            elif responding:  # a pipelined head while the previous response is still going out
                self._arm(_HEAD_DUE, self.head_timeout)
            else:
                self._reject(408, b"The request head did not arrive in time.\n")
            return
        # phase == _BODY
        now = self.loop.time()
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            # Not the client's fault: we stopped reading (the app is not consuming the body yet) or
            # the app has not asked for the body of an ``Expect: 100-continue`` request.
            self._body_started = self._body_progress = now
            self._arm(_BODY_DUE, self._body_wait())
            return
        due = min(
            self._body_progress + self.body_timeout if self.body_timeout else float("inf"),
            self._body_started + self.body_deadline if self.body_deadline else float("inf"),
        )
        if due > now + 0.001:
            self._arm(_BODY_DUE, due - now)
        elif cycle is not None and cycle.response_complete:
            self.transport.close()  # answered already (a 413, say): the rest of the body is not needed
        elif responding:  # the app answers without waiting for the body: do not cut its response
            self._arm(_BODY_DUE, self._body_wait())
        else:
            self._reject(408, b"The request body did not arrive in time.\n")

    def _reject(self, status: int, message: bytes) -> None:
        """Answer ``status`` with ``connection: close``, stop parsing, and linger briefly."""
        self._disarm()
        self._rejected = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # never write an answer into the middle of another
                self.transport.close()
                return
            # The app is waiting for this request's body: its next receive() says http.disconnect
            # and whatever it sends is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        _RejectionLog.report(self.logger, status, self.client)
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])]
        for name, value in self.server_state.default_headers:
            parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(
            b"content-type: text/plain; charset=utf-8\r\n%scontent-length: %d\r\nconnection: close\r\n\r\n"
            % (NOSNIFF, len(message))
        )
        parts.append(message)
        transport = self.transport
        transport.write(b"".join(parts))
        if transport.can_write_eof():
            transport.write_eof()  # the client reads the answer, then EOF; we read on briefly
            self._arm(_LINGER, LINGER_SECONDS)
        else:
            transport.close()
