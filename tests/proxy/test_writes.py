"""Writes at the loop's next turn (proxy.writes): what one turn wrote goes out together, in order per
socket, and nothing goes to a socket given up in between; while the loop is quiet, a turn's first
write goes out at once."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.httpclient import Pool
from proxy.writes import Outgoing, outgoing
from tests.support.transports import Transport, next_turn


async def test_the_writes_of_one_turn_go_out_at_the_next_in_order_per_socket() -> None:
    out = Outgoing(asyncio.get_running_loop())
    first, second = Transport(), Transport()
    out.write(first, b"a")  # type: ignore[arg-type]
    out.write(second, b"b")  # type: ignore[arg-type]
    out.write(first, b"c")  # type: ignore[arg-type]
    assert first.written == [] and second.written == []
    await next_turn()
    assert first.written == [b"ac"]
    assert second.written == [b"b"]
    out.write(second, b"d")  # type: ignore[arg-type]
    await next_turn()
    assert second.written == [b"b", b"d"]


async def test_a_socket_closed_before_the_turn_ends_gets_nothing() -> None:
    out = Outgoing(asyncio.get_running_loop())
    gone, kept = Transport(), Transport()
    out.write(gone, b"request")  # type: ignore[arg-type]
    out.write(kept, b"request")  # type: ignore[arg-type]
    gone.closed = True
    await next_turn()
    assert gone.written == []
    assert kept.written == [b"request"]


async def test_flush_for_writes_one_socket_now_and_not_again() -> None:
    out = Outgoing(asyncio.get_running_loop())
    now, later = Transport(), Transport()
    for transport in (now, later):
        out.write(transport, b"x")  # type: ignore[arg-type]
    out.flush_for(now)  # type: ignore[arg-type]
    assert now.written == [b"x"] and later.written == []
    await next_turn()
    assert now.written == [b"x"]  # not twice
    assert later.written == [b"x"]


async def test_while_the_loop_is_quiet_a_turns_first_write_goes_out_at_once_and_the_rest_wait() -> None:
    """At one client a turn has one write, and waiting for the next turn only adds a turn of the loop
    to the request. After a turn whose waiting writes went to one socket, the next turn's first write
    goes out at once and the rest of that turn's wait and leave together; after a turn whose waiting
    writes went to several sockets, every write waits again."""
    out = Outgoing(asyncio.get_running_loop())
    a, b, c = Transport(), Transport(), Transport()
    out.write(a, b"1")  # type: ignore[arg-type]
    assert a.written == []  # nothing known about the loop yet: it waits
    await next_turn()
    assert a.written == [b"1"]  # one socket waited: the loop is quiet
    out.write(a, b"2")  # type: ignore[arg-type]
    assert a.written == [b"1", b"2"]  # at once
    out.write(b, b"3")  # type: ignore[arg-type]
    out.write(b, b"4")  # type: ignore[arg-type]
    assert b.written == []  # the rest of the turn waits
    await next_turn()
    assert b.written == [b"34"]  # together
    out.write(c, b"5")  # type: ignore[arg-type]
    assert c.written == [b"5"]  # one socket waited: quiet still
    await next_turn()  # nothing else was written in that turn: quiet still
    out.write(a, b"6")  # type: ignore[arg-type]
    out.write(b, b"7")  # type: ignore[arg-type]
    out.write(c, b"8")  # type: ignore[arg-type]
    assert (a.written[-1], b.written, c.written) == (b"6", [b"34"], [b"5"])
    await next_turn()  # two sockets waited: the loop is busy
    assert (b.written, c.written) == ([b"34", b"7"], [b"5", b"8"])
    out.write(a, b"9")  # type: ignore[arg-type]
    assert a.written[-1] == b"6"  # waits
    await next_turn()
    assert a.written[-1] == b"9"


async def test_a_write_told_to_wait_waits_on_a_quiet_loop_and_nothing_overtakes_it() -> None:
    out = Outgoing(asyncio.get_running_loop())
    out.direct = True  # the last turn's writes went to one socket
    a = Transport()
    out.write(a, b"chunk", wait=True)  # type: ignore[arg-type]
    out.write(a, b"end")  # type: ignore[arg-type]
    assert a.written == []
    await next_turn()
    assert a.written == [b"chunkend"]


async def test_each_loop_has_its_own_writes() -> None:
    loop = asyncio.get_running_loop()
    assert outgoing(loop) is outgoing(loop)
    other = asyncio.new_event_loop()
    try:
        assert outgoing(other) is not outgoing(loop)
        assert outgoing(other).loop is other
    finally:
        other.close()


async def test_a_request_given_up_in_the_turn_it_was_sent_on_a_busy_loop_never_reaches_the_engine() -> None:
    seen: list[bytes] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = TestServer(app)
    await server.start_server()
    pool = Pool(asyncio.get_running_loop(), 10)
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    try:
        # A connection is open and idle, so the next request is handed it and queued in one turn.
        response = await pool.request("POST", url, b'{"n":1}', headers, connect=2, total=10)
        await response.read()
        outgoing(asyncio.get_running_loop()).direct = False  # a busy loop: every write waits for the next turn
        given_up = pool.request("POST", url, b'{"n":2}', headers, connect=2, total=10)
        given_up.send(None)  # it runs up to its wait for the answer's head: its bytes wait for the next turn
        with pytest.raises(asyncio.CancelledError):  # cancelled before that turn (its client left, say)
            given_up.throw(asyncio.CancelledError())
        answered = await pool.request("POST", url, b'{"n":3}', headers, connect=2, total=10)
        assert answered.status == 200
        await answered.read()
        assert seen == [b'{"n":1}', b'{"n":3}']
    finally:
        pool.close()
        await server.close()
