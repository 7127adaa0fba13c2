"""The HTTP edge's lane for ``/v1/*`` (routerpanel/proxylane.py) and its keep-alive timer
(routerpanel/httpedge.py): the lane's answers are byte for byte uvicorn's own, other paths still go
through the mount, and an idle keep-alive connection is closed while a busy one is not."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
from uvicorn.server import ServerState

from proxy.writes import outgoing
from routerpanel.httpedge import GuardedHttpToolsProtocol
from routerpanel.proxylane import Lane, ProxyCycle, lane_for
from tests.support.transports import Transport, next_turn
from tests.support.wait import wait_until_async

DEFAULTS = [(b"date", b"Tue, 01 Dec 2026 05:00:00 GMT"), (b"server", b"uvicorn")]
JSON_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", b"7"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-request-id", b"abc"),
]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def cycle(kind: type[RequestResponseCycle], transport: Transport, *, method: str = "POST", keep_alive: bool = True):
    c = kind(
        scope={"type": "http", "method": method, "path": "/v1/chat/completions"},  # type: ignore[typeddict-item]
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test"),
        access_log=False,
        default_headers=DEFAULTS,
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )
    if isinstance(c, ProxyCycle):
        c.outgoing = outgoing(asyncio.get_running_loop())  # as ``start_in_lane`` gives it
    return c


async def answer(kind: type[RequestResponseCycle], messages: list[dict], **options: Any) -> tuple[Any, ...]:
    """What a cycle of ``kind`` writes for ``messages`` (or the error it raises), and its state after."""
    transport = Transport()
    c = cycle(kind, transport, **options)
    try:
        for message in messages:
            await c.send(message)
    except RuntimeError as exc:
        await next_turn()
        return ("error", str(exc), transport.output())
    await next_turn()
    return (transport.output(), transport.closed, c.response_complete, c.chunked_encoding, c.keep_alive)


def start(status: int, headers: list[tuple[bytes, bytes]]) -> dict:
    return {"type": "http.response.start", "status": status, "headers": headers}


def body(data: bytes, more: bool = False) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


CASES: dict[str, tuple[list[dict], dict]] = {
    "json": ([start(200, JSON_HEADERS), body(b'{"a":1}')], {}),
    "error json": ([start(404, JSON_HEADERS), body(b'{"a":1}')], {}),
    "stream": ([start(200, SSE_HEADERS), body(b"data: 1\n\n", True), body(b"data: 2\n\n", True), body(b"")], {}),
    "stream with an empty chunk": ([start(200, SSE_HEADERS), body(b"a", True), body(b"", True), body(b"b")], {}),
    "chunk after the last": ([start(200, SSE_HEADERS), body(b"a"), body(b"b", True)], {}),
    "chunks after the last": ([start(200, SSE_HEADERS), body(b"a", True), body(b"b"), body(b"c", True)], {}),
    "a long stream": ([start(200, SSE_HEADERS), *[body(b"data: %d\n\n" % i, True) for i in range(40)], body(b"")], {}),
    "a head mid-stream": ([start(200, SSE_HEADERS), body(b"a", True), body(b"b", True), start(200, [])], {}),
    "HEAD of a stream": ([start(200, SSE_HEADERS), body(b"a", True), body(b"b", True), body(b"")], {"method": "HEAD"}),
    "no headers": ([start(200, []), body(b"x")], {}),
    "connection close": ([start(200, [*JSON_HEADERS, (b"connection", b"close")]), body(b'{"a":1}')], {}),
    "chunked by the app": ([start(200, [(b"transfer-encoding", b"chunked")]), body(b"x")], {}),
    "name in capitals": ([start(200, [(b"Content-Length", b"1")]), body(b"x")], {}),
    "value with a newline": ([start(200, [(b"x-a", b"1\r\nx-b: 2")]), body(b"x")], {}),
    "name with a space": ([start(200, [(b"x a", b"1")]), body(b"x")], {}),
    "name with a colon": ([start(200, [(b"x:a", b"1")]), body(b"x")], {}),
    "name with a byte above ASCII": ([start(200, [(b"x-\xe9", b"1")]), body(b"x")], {}),
    "value with a tab and bytes above ASCII": ([start(200, [(b"x-a", b"1\t\xe9 2")]), body(b"x")], {}),
    "value with a DEL": ([start(200, [(b"x-a", b"1\x7f")]), body(b"x")], {}),
    "value with a NUL": ([start(200, [(b"x-a", b"1\x00")]), body(b"x")], {}),
    "HEAD": ([start(200, JSON_HEADERS), body(b"")], {"method": "HEAD"}),
    "204": ([start(204, []), body(b"")], {}),
    "last request of the connection": ([start(200, JSON_HEADERS), body(b'{"a":1}')], {"keep_alive": False}),
    "too long for its content-length": ([start(200, JSON_HEADERS), body(b'{"a":12}')], {}),
    "body before the head": ([body(b"x")], {}),
    "body in parts": ([start(200, JSON_HEADERS), body(b'{"a"', True), body(b":1}")], {}),
    "too short for its content-length": ([start(200, JSON_HEADERS), body(b"{}")], {}),
    "a second head": ([start(200, JSON_HEADERS), start(200, JSON_HEADERS)], {}),
}


@pytest.mark.parametrize("case", CASES)
async def test_the_lane_answers_exactly_as_uvicorn_does(case: str) -> None:
    messages, options = CASES[case]
    assert await answer(ProxyCycle, messages, **options) == await answer(RequestResponseCycle, messages, **options)


async def test_the_head_goes_out_with_the_first_body_in_one_write() -> None:
    """One write to the socket for a whole answer (uvicorn makes two), made at the loop's next turn
    with the other writes of this one (proxy.writes) and before the app goes on, and a stream's head
    with its first chunk at once; a head whose body never came is never sent (the connection is
    closed instead)."""
    transport = Transport()
    c = cycle(ProxyCycle, transport)
    await c.send(start(200, JSON_HEADERS))
    assert transport.written == []
    await c.send(body(b'{"a":1}'))
    assert c.response_complete
    assert len(transport.written) == 1 and transport.written[0].endswith(b'\r\n\r\n{"a":1}')

    transport = Transport()
    c = cycle(ProxyCycle, transport)
    await c.send(start(200, SSE_HEADERS))
    await c.send(body(b"data: 1\n\n", True))
    await next_turn()
    assert len(transport.written) == 1 and transport.written[0].endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n")
    await c.send(body(b"data: 2\n\n", True))
    await c.send(body(b""))
    assert c.response_complete
    assert transport.written[1:] == [b"9\r\ndata: 2\n\n\r\n0\r\n\r\n"]


async def test_on_a_quiet_loop_an_answer_goes_out_at_once_and_the_app_goes_on_in_the_same_turn() -> None:
    """At one client (proxy.writes: a quiet loop) a whole answer is written at once and the app's
    bookkeeping after it does not wait for a turn of the loop. A stream's writes still wait for the
    turn's end, as on a busy loop."""
    loop = asyncio.get_running_loop()
    transport = Transport()
    c = cycle(ProxyCycle, transport)
    await c.send(start(200, JSON_HEADERS))
    outgoing(loop).direct = True  # the last turn's writes went to one socket
    sending = c.send(body(b'{"a":1}'))
    with pytest.raises(StopIteration):  # done without giving the loop a turn
        sending.send(None)
    assert len(transport.written) == 1 and transport.written[0].endswith(b'\r\n\r\n{"a":1}')

    await next_turn()  # nothing else was written: still quiet
    assert outgoing(loop).direct
    transport = Transport()
    c = cycle(ProxyCycle, transport)
    await c.send(start(200, SSE_HEADERS))
    await c.send(body(b"data: 1\n\n", True))
    assert transport.written == []
    await next_turn()
    assert len(transport.written) == 1 and transport.written[0].endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n")


async def test_a_stream_read_in_one_turn_leaves_in_one_write_and_before_the_app_goes_on() -> None:
    """A fast engine's whole stream arrives in one read: its head, its events and its end are
    written together at the loop's next turn (three writes before, each waking the client), and
    the app's bookkeeping after the last message waits for that write."""
    transport = Transport()
    c = cycle(ProxyCycle, transport)
    await c.send(start(200, SSE_HEADERS))
    await c.send(body(b"data: 1\n\ndata: 2\n\n", True))
    await c.send(body(b"data: [DONE]\n\n", True))
    assert transport.written == []
    await c.send(body(b""))
    assert len(transport.written) == 1 and c.response_complete
    head, chunks = transport.written[0].split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in head
    assert chunks == b"12\r\ndata: 1\n\ndata: 2\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"


async def test_an_answer_cancelled_while_it_waits_for_the_loops_next_turn_is_still_written() -> None:
    transport = Transport()
    c = cycle(ProxyCycle, transport)
    await c.send(start(200, JSON_HEADERS))
    sending = c.send(body(b'{"a":1}'))
    sending.send(None)  # the answer is queued for the loop's next turn and the app waits for it
    assert transport.written == []
    with pytest.raises(asyncio.CancelledError):  # cancelled before that turn (a forced shutdown, say)
        sending.throw(asyncio.CancelledError())
    assert len(transport.written) == 1 and transport.written[0].endswith(b'\r\n\r\n{"a":1}')
    await next_turn()
    assert len(transport.written) == 1  # not twice


async def test_a_stream_cancelled_while_its_end_waits_for_the_loops_next_turn_still_ends() -> None:
    transport = Transport()
    c = cycle(ProxyCycle, transport)
    await c.send(start(200, SSE_HEADERS))
    await c.send(body(b"a", True))
    sending = c.send(body(b"b"))
    sending.send(None)
    with pytest.raises(asyncio.CancelledError):
        sending.throw(asyncio.CancelledError())
    assert transport.output().endswith(b"\r\n\r\n1\r\na\r\n1\r\nb\r\n0\r\n\r\n")
    await next_turn()
    assert transport.output().count(b"0\r\n\r\n") == 1  # not twice


@pytest.mark.parametrize("kind", [ProxyCycle, RequestResponseCycle])
async def test_a_stream_whose_server_stops_meanwhile_ends_and_closes_its_connection(kind) -> None:
    """A shutdown while a stream runs makes it the connection's last (``routerpanel.httpedge``):
    every chunk still reaches the client, the end too, and then the connection closes, as uvicorn
    does it."""
    transport = Transport()
    c = cycle(kind, transport)
    await c.send(start(200, SSE_HEADERS))
    await c.send(body(b"a", True))
    await next_turn()
    await c.send(body(b"b", True))
    c.keep_alive = False  # what the edge's shutdown does to the cycle of a response in progress
    await c.send(body(b"c"))
    await next_turn()
    assert transport.output().endswith(b"\r\n\r\n1\r\na\r\n1\r\nb\r\n1\r\nc\r\n0\r\n\r\n")
    assert transport.closed and c.response_complete


@pytest.mark.parametrize("kind", [ProxyCycle, RequestResponseCycle])
async def test_a_stream_stops_writing_when_its_client_left_and_waits_while_writing_is_paused(kind) -> None:
    """What the lane's short way for a stream's chunks skips is only what it already knows: a client
    gone still drops the rest, a full socket buffer still holds the next chunk back until drained."""
    transport = Transport()
    c = cycle(kind, transport)
    await c.send(start(200, SSE_HEADERS))
    await c.send(body(b"a", True))
    c.flow.pause_writing()
    held = asyncio.ensure_future(c.send(body(b"b", True)))
    await asyncio.sleep(0)
    assert not held.done() and transport.output().endswith(b"1\r\na\r\n")
    c.flow.resume_writing()
    await held
    assert transport.output().endswith(b"1\r\na\r\n1\r\nb\r\n")
    c.disconnected = True
    await c.send(body(b"c", True))
    await c.send(body(b""))
    assert transport.output().endswith(b"1\r\nb\r\n") and not c.response_complete


# -- through the protocol ---------------------------------------------------------------------------


class Mount:
    """RouterPanel's mount as the edge sees it: an ASGI app with a ``lane`` for ``/v1/*``."""

    def __init__(self) -> None:
        self.through_mount: list[str] = []
        self.through_lane: list[str] = []
        self.lane = Lane(self.proxy, (b"/v1/",))
        self.hold: asyncio.Event | None = None
        self.fail_after_head = False
        self.after_answer: Any = None  # called right after the answer was sent, in the same turn
        self.tasks: list[str] = []  # the name of the task each request ran in

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.through_mount.append(scope["path"])
        await self.reply(scope, receive, send)

    async def proxy(self, scope: dict, receive: Any, send: Any) -> None:
        self.through_lane.append(scope["path"])
        await self.reply(scope, receive, send)

    async def reply(self, scope: dict, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task.get_name())
        request = await receive()
        if self.hold is not None:
            await self.hold.wait()
        data = b"%s %s %s" % (scope["method"].encode(), scope["path"].encode(), request["body"])
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if self.fail_after_head:
            raise RuntimeError("the app failed after its head")
        await send({"type": "http.response.body", "body": data})
        if self.after_answer is not None:
            self.after_answer()


def protocol(mount: Mount, **config: Any) -> tuple[GuardedHttpToolsProtocol, Transport]:
    server = Config(mount, http=GuardedHttpToolsProtocol, lifespan="off", access_log=False, **config)
    server.load()
    state = ServerState()
    state.default_headers = DEFAULTS
    proto = GuardedHttpToolsProtocol(server, state, {}, asyncio.get_running_loop())
    transport = Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport


def request(path: str, data: bytes = b"hi") -> bytes:
    return b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (path.encode(), len(data), data)


async def served(transport: Transport, count: int) -> list[bytes]:
    await wait_until_async(lambda: transport.output().count(b"HTTP/1.1 200 OK") >= count, 5.0, "no answer")
    return [b"HTTP/1.1 200 OK" + part for part in transport.output().split(b"HTTP/1.1 200 OK")[1:]]


async def test_v1_requests_take_the_lane_and_others_the_mount_with_the_same_answers() -> None:
    mount = Mount()
    proto, transport = protocol(mount)
    assert lane_for(proto.config, proto.access_log) == mount.lane  # found behind the proxy-headers middleware
    proto.data_received(request("/v1/chat/completions"))
    proto.data_received(request("/v1/chat%2Fcompletions"))  # decoded as uvicorn decodes it
    proto.data_received(request("/v2/chat/completions"))
    answers = await served(transport, 3)
    assert mount.through_lane == ["/v1/chat/completions", "/v1/chat/completions"]
    assert mount.through_mount == ["/v2/chat/completions"]
    assert answers[0] == answers[1]
    assert answers[0].replace(b"v1", b"v2") == answers[2]


async def test_pipelined_lane_requests_are_answered_in_order() -> None:
    mount = Mount()
    proto, transport = protocol(mount)
    proto.data_received(request("/v1/a", b"1") + request("/v1/b", b"2") + request("/v1/c", b"3"))
    answers = await served(transport, 3)
    assert [a.rsplit(b"\r\n\r\n", 1)[1] for a in answers] == [b"POST /v1/a 1", b"POST /v1/b 2", b"POST /v1/c 3"]


async def test_every_request_runs_in_a_named_task_the_connection_tracks_and_a_task_factory_still_counts() -> None:
    mount = Mount()
    proto, transport = protocol(mount)
    mount.hold = asyncio.Event()
    proto.data_received(request("/v1/a") + request("/v1/b"))  # the second waits in the pipeline
    proto.data_received(request("/v2/c"))
    await wait_until_async(lambda: mount.tasks, 5.0, "the first request never started")
    assert len(proto.tasks) == 1
    mount.hold.set()
    await served(transport, 3)
    assert mount.tasks == ["routerpanel-request"] * 3
    await wait_until_async(lambda: not proto.tasks, 5.0, "a finished request's task is still tracked")

    loop = asyncio.get_running_loop()
    made: list[str] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **options: Any) -> asyncio.Task:
        made.append("factory")
        return asyncio.Task(coro, loop=loop, **options)

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        proto.data_received(request("/v1/d"))
        await served(transport, 4)
    finally:
        loop.set_task_factory(None)
    assert made == ["factory"]


@pytest.mark.parametrize("config", [{"root_path": "/api"}, {"limit_concurrency": 10}, {"log_level": "trace"}])
async def test_without_the_procfiles_server_settings_every_request_goes_through_the_mount(config: dict) -> None:
    mount = Mount()
    proto, transport = protocol(mount, **config)
    proto.data_received(request("/v1/chat/completions"))
    await served(transport, 1)
    assert (mount.through_lane, len(mount.through_mount)) == ([], 1)


async def test_an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not() -> None:
    mount = Mount()
    proto, transport = protocol(mount, timeout_keep_alive=0.2)
    proto.data_received(request("/v1/a"))
    await served(transport, 1)
    assert proto.timeout_keep_alive_task is not None
    # A second request is answered only after the keep-alive timeout passed: the timer fires while
    # it is in progress and must leave the connection open.
    mount.hold = asyncio.Event()
    proto.data_received(request("/v1/b"))
    await wait_until_async(lambda: proto.timeout_keep_alive_task is None, 5.0, "the keep-alive timer never fired")
    assert not transport.closed
    mount.hold.set()
    await served(transport, 2)
    assert not transport.closed
    await wait_until_async(lambda: transport.closed, 5.0, "the idle connection was never closed")
    assert transport.output().count(b"HTTP/1.1 200 OK") == 2


async def test_an_answer_that_fails_after_its_head_sends_the_client_no_200() -> None:
    """The app failed between its head and its body: uvicorn would have sent the 200 head before
    closing; in the lane the client gets nothing but the closed connection (no success that lies)."""
    mount = Mount()
    mount.fail_after_head = True
    proto, transport = protocol(mount)
    proto.data_received(request("/v1/chat/completions"))
    await wait_until_async(lambda: transport.closed, 5.0, "the connection was never closed")
    assert mount.through_lane == ["/v1/chat/completions"]
    assert transport.output() == b""


@pytest.mark.parametrize("target", [b"/v1/\xff", b"/v2/\xff"])
async def test_a_malformed_request_target_gets_400_in_the_lane_as_outside_it(target: bytes) -> None:
    mount = Mount()
    proto, transport = protocol(mount)
    proto.data_received(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi" % target)
    await wait_until_async(lambda: transport.closed, 5.0, "the connection was never closed")
    assert transport.output().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert (mount.through_lane, mount.through_mount) == ([], [])


async def test_an_answer_waiting_for_the_next_turn_goes_out_before_what_the_next_read_makes_the_server_write() -> None:
    """The lane's answer waits for the loop's next turn (proxy.writes); bytes that arrive before
    then (here a malformed pipelined request, answered 400 at once) must not overtake it."""
    mount = Mount()
    proto, transport = protocol(mount)
    mount.after_answer = lambda: proto.data_received(b"NOT HTTP\r\n\r\n")
    proto.data_received(request("/v1/a"))
    await wait_until_async(lambda: transport.closed, 5.0, "the connection was never closed")
    output = transport.output()
    assert output.startswith(b"HTTP/1.1 200 OK\r\n")
    assert output.index(b"POST /v1/a hi") < output.index(b"HTTP/1.1 400 Bad Request\r\n")


async def test_a_shutdown_right_after_an_answer_still_sends_it() -> None:
    """A worker told to stop (no drain) closes an idle connection at once: the answer waiting for
    the loop's next turn goes out first."""
    mount = Mount()
    proto, transport = protocol(mount)
    proto.shutdown_drain = 0
    mount.after_answer = proto.shutdown
    proto.data_received(request("/v1/a"))
    await wait_until_async(lambda: transport.closed, 5.0, "the connection was never closed")
    assert transport.output().startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.output().endswith(b"POST /v1/a hi")
