"""The data path's lane through the HTTP edge: requests for ``/v1/*`` skip uvicorn's generic
per-request work and go straight to the proxy app.

``routerpanel.httpedge`` sends a request this way when its URL starts with one of the prefixes the
mount gives (``proxy.mount.ProxyMount.lane``: ``/v1/``, every path under which is the proxy app's),
it is no upgrade, and the server runs as the Procfile starts it
(no access log, no root path, no concurrency limit, the application RouterPanel's own mount, at most
behind uvicorn's proxy-headers middleware). Any other request takes uvicorn's own way, unchanged.

What the lane leaves out, none of which the proxy app needs:

- uvicorn's proxy-headers middleware (``X-Forwarded-For``/``-Proto`` into the scope's ``client`` and
  ``scheme``: the proxy app reads neither) and the mount's dispatch (the path is known to be the
  proxy app's);
- the response head's per-header checks: the same checks (the bytes uvicorn's own expressions
  allow, deleted with ``bytes.translate``) run once over all the names and once over all the
  values, and anything unusual (a ``connection`` or
  ``transfer-encoding`` header, a name not in lower case, a ``HEAD`` request, a 204 or 304) goes
  through uvicorn's ``send``;
- writing the head as soon as the app sends ``http.response.start``: the lane holds it until the
  first ``http.response.body`` and writes both at once, as the ASGI HTTP spec asks of a server ("must
  not start sending the response to the client until it has received at least one Response Body
  event"). A whole answer thus costs one write to the socket where uvicorn makes two, and a client
  never sees the head of an answer whose body never came (the app failed in between: the connection
  is closed with nothing sent);
- writing at once: a whole answer, and each chunk of a stream, goes out at the event loop's next
  turn with the other writes of this one (``proxy.writes``, decision 0015 in docs/decisions/), and
  the app waits for that turn after an answer's last message, before its bookkeeping; the edge
  writes what waits first when bytes arrive on the connection or it shuts down
  (``routerpanel.httpedge``), and so does anything that goes uvicorn's way. A fast engine's whole
  stream, read in one turn, leaves with its head and its end in one write (uvicorn makes three);
- for a stream whose head the lane wrote, uvicorn's checks per chunk: a chunk is framed by the lane
  while the client is there and the socket not paused (about 0.27 µs a chunk instead of 0.45 in a
  micro-benchmark; a paced engine's stream is one chunk per token).

Everything else is uvicorn's ``RequestResponseCycle``: the other body messages, the disconnect
messages, flow control, ``Expect: 100-continue``, the 500 for an application error, the
response-complete callback. With the
edge's keep-alive timer (``routerpanel.httpedge``) this took the web worker's CPU per proxied request
at c=32 from 153-171 µs to 143-164 µs (4 alternating runs) and the added p50 latency at one client
from 291-324 µs to 255-281 µs (3 alternating runs). Writing the head with the body took the CPU per
proxied request from 92-96 µs to 84-88 µs (4 alternating runs, on a faster machine), a PD request's
from 155-162 µs to 145-152 µs (3 runs), and the p50 at one client from 228-232 µs to 210-223 µs.
"""

from __future__ import annotations

import asyncio
from operator import itemgetter
from typing import Any, NamedTuple
from urllib.parse import unquote

import httptools
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from proxy.tasks import named_task
from proxy.writes import Outgoing

__all__ = ["REQUEST_TASK", "Lane", "ProxyCycle", "lane_for", "start_in_lane", "start_task"]

_CONTENT_LENGTH = b"content-length"
REQUEST_TASK = "routerpanel-request"  # the name of the task a request runs in


class Lane(NamedTuple):
    """What the mount hands the lane: its app, and the URL prefixes that are all that app's."""

    app: Any
    prefixes: tuple[bytes, ...]


def lane_for(config: Config, access_log: bool) -> Lane | None:
    """The lane of RouterPanel's mount (``proxy.mount.ProxyMount.lane``) when the server runs that
    mount, at most behind uvicorn's proxy-headers middleware, without an access log, root path or
    concurrency limit; else None."""
    if access_log or config.root_path or config.limit_concurrency is not None:
        return None
    app = config.loaded_app
    if isinstance(app, ProxyHeadersMiddleware):
        app = app.app
    return getattr(app, "lane", None)


def start_in_lane(protocol: HttpToolsProtocol, app: Any, outgoing: Outgoing) -> None:
    """uvicorn's ``on_headers_complete`` for a request of the lane: the same scope, a
    ``ProxyCycle`` writing through ``outgoing`` (the connection's loop's), and ``app`` itself in
    place of the middleware and the mount."""
    parser, scope = protocol.parser, protocol.scope
    http_version = parser.get_http_version()
    scope["method"] = parser.get_method().decode("ascii")
    if http_version != "1.1":
        scope["http_version"] = http_version
    url = httptools.parse_url(protocol.url)
    path = url.path.decode("ascii")
    scope["path"] = unquote(path) if "%" in path else path
    scope["raw_path"] = url.path
    scope["query_string"] = url.query or b""
    cycle = ProxyCycle(
        scope=scope,
        transport=protocol.transport,
        flow=protocol.flow,
        logger=protocol.logger,
        access_logger=protocol.access_logger,
        access_log=False,
        default_headers=protocol.server_state.default_headers,
        message_event=asyncio.Event(),
        expect_100_continue=protocol.expect_100_continue,
        keep_alive=http_version != "1.0" and parser.should_keep_alive(),
        on_response=protocol.on_response_complete,
    )
    cycle.outgoing = outgoing
    previous, protocol.cycle = protocol.cycle, cycle
    if previous is None or previous.response_complete:
        start_task(protocol, cycle, app)
    else:  # pipelined: it starts when the previous response is complete, as in uvicorn
        protocol.flow.pause_reading()
        protocol.pipeline.appendleft((cycle, app))


def start_task(protocol: HttpToolsProtocol, cycle: RequestResponseCycle, app: Any) -> None:
    """uvicorn's ``_start_asgi_task`` for every request of the edge, with the task named
    ``REQUEST_TASK`` as it is made (``proxy.tasks``); uvicorn's context reset takes uvicorn's way."""
    if getattr(protocol.config, "reset_contextvars", False):
        HttpToolsProtocol._start_asgi_task(protocol, cycle, app)
        return
    task = named_task(protocol.loop, cycle.run_asgi(app), REQUEST_TASK)
    task.add_done_callback(protocol.tasks.discard)
    protocol.tasks.add(task)


class ProxyCycle(RequestResponseCycle):
    """uvicorn's request-response cycle with a cheaper response head, written with the first body
    message (see the module doc)."""

    pending = b""  # the response head, until the first body message goes out with it
    outgoing: Outgoing  # where what the lane writes waits for the loop's next turn (``proxy.writes``)
    streaming = False  # the lane wrote a chunked head: a stream's later chunks take the short way

    async def send(self, message: Any) -> None:
        if self.pending:
            await self._send_with_head(message)
            return
        if (
            self.streaming
            and not (self.response_complete or self.disconnected or self.flow.write_paused)
            and message["type"] == "http.response.body"
        ):
            # A stream's chunk, without uvicorn's checks of what the lane already knows (the head is
            # out, chunked, not for a HEAD) and its second coroutine. Everything unusual goes
            # uvicorn's way below.
            if self._chunk(b"", message.get("body", b""), message.get("more_body", False)):
                await self._written()
            return
        framed = None
        if not (
            self.response_started
            or self.disconnected
            or self.flow.write_paused
            or message["type"] != "http.response.start"
            or self.scope["method"] == "HEAD"
        ):
            framed = _head(message["status"], self.default_headers, message.get("headers", ()), self.keep_alive)
        if framed is None:  # uvicorn's own way (the body, the unusual heads, and its errors)
            self.outgoing.flush_for(self.transport)  # after what waits for the loop's next turn
            await RequestResponseCycle.send(self, message)
            return
        head, length = framed
        self.response_started = True
        self.waiting_for_100_continue = False
        if length is None:
            self.chunked_encoding = self.streaming = True
        else:
            self.expected_content_length = int(length)
            self.chunked_encoding = False
        self.pending = head

    async def _send_with_head(self, message: Any) -> None:
        """The first message after the head: a body goes out in the same write as the head (a
        whole answer, or a stream's first chunk); anything else, the head and then uvicorn's way."""
        data, self.pending = self.pending, b""
        if message["type"] == "http.response.body" and not (self.disconnected or self.flow.write_paused):
            body = message.get("body", b"")
            more_body = message.get("more_body", False)
            if self.chunked_encoding:
                if self._chunk(data, body, more_body):
                    await self._written()
                return
            if not more_body and len(body) == self.expected_content_length:
                self.outgoing.write(self.transport, data + body)
                self.expected_content_length = 0
                self._complete()
                await self._written()
                return
        # A body in parts or of the wrong length, a message out of turn, a client gone.
        self.outgoing.flush_for(self.transport)
        if not self.disconnected:
            self.transport.write(data)
        await RequestResponseCycle.send(self, message)

    def _chunk(self, data: bytes, body: bytes, more_body: bool) -> bool:
        """Write ``data`` (the head, or nothing) and ``body`` framed as uvicorn frames a chunk, and the
        body's end when ``more_body`` is false, at the loop's next turn with the other writes of
        this one, quiet or not (``proxy.writes``): a fast engine's whole stream leaves with its head
        and its end in one write.
        Returns whether the answer is complete (its caller then waits for that turn)."""
        if body:
            data += b"%x\r\n%s\r\n" % (len(body), body)
        if more_body:
            if data:
                self.outgoing.write(self.transport, data, wait=True)
            return False
        self.outgoing.write(self.transport, data + _LAST_CHUNK, wait=True)
        self._complete()
        return True

    async def _written(self) -> None:
        """Wait for the loop's next turn, which writes the answer's end (``proxy.writes``): the app's
        bookkeeping after its answer waits for the write, not the other way round (without this
        wait, one client waited for both). Written at once (``Outgoing.direct``), it does not wait."""
        if self.transport not in self.outgoing.pending:
            return
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:  # cancelled meanwhile (a forced shutdown): it still goes
            self.outgoing.flush_for(self.transport)
            raise

    def _complete(self) -> None:
        # uvicorn's end of a response. The lane writes a head only on a connection kept alive; a
        # shutdown since (``routerpanel.httpedge``) makes this answer the connection's last.
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.outgoing.flush_for(self.transport)
            self.transport.close()
        self.on_response()


_LAST_CHUNK = b"0\r\n\r\n"  # the end of a chunked body
_CRLF = b"\r\n"  # a header line's end; the blank line that ends a head
_END_CHUNKED = b"transfer-encoding: chunked\r\n\r\n"
_NAME, _VALUE = itemgetter(0), itemgetter(1)
_PAIR = b": ".join
# The bytes uvicorn's expressions allow in a name (and not a capital letter: the lane writes lower
# case names only) and in a value, for ``bytes.translate`` to delete: a tenth of the expressions'
# time on a head's few hundred bytes.
_NAME_OK = bytes(c for c in range(256) if not HEADER_RE.match(bytes((c,))) and not 0x41 <= c <= 0x5A)
_VALUE_OK = bytes(c for c in range(256) if not HEADER_VALUE_RE.match(bytes((c,))))


def _head(
    status: int, default_headers: list[tuple[bytes, bytes]], app_headers: Any, keep_alive: bool
) -> tuple[bytes, bytes | None] | None:
    """The response head (status line, the server's and the app's headers, the framing, the blank
    line) and the app's content-length, when the lane can write it: every name in lower case and
    valid, every value valid, and no framing header of the app's; else None."""
    # map and itemgetter rather than comprehensions: no function object and frame per call.
    headers = [*default_headers, *app_headers]
    names = b"".join(map(_NAME, headers))
    if (
        not keep_alive
        or status not in STATUS_LINE
        or status in (204, 304)
        # Each character is checked alone, so the names joined are checked as each name would be:
        # what is left once the allowed bytes are deleted is what uvicorn's expression would find.
        or names.translate(None, _NAME_OK)
        or b"".join(map(_VALUE, headers)).translate(None, _VALUE_OK)
        # A header that changes the body's framing or the connection's fate (its name within
        # another's, as x-connection-id, only costs the cheaper way). ``find``, not ``in``: on
        # Python 3.11, ``bytes in bytes`` first tries its operand as an integer and builds and
        # clears a TypeError, 1.9 k instructions a search (docs/architecture.md).
        or names.find(b"connection") >= 0
        or names.find(b"transfer-encoding") >= 0
    ):
        return None
    length = None
    for name, value in app_headers:
        if name == _CONTENT_LENGTH:
            length = value
            break
    end = _CRLF if length is not None else _END_CHUNKED
    if not headers:
        return STATUS_LINE[status] + end, length
    return b"".join((STATUS_LINE[status], _CRLF.join(map(_PAIR, headers)), _CRLF, end)), length
