"""The data path's HTTP client (proxy.httpclient): kept-alive connections, engines that close
them, streamed answers and the errors the attempt loop's rules are written against."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.httpclient import Pool
from proxy.httpclient.connections import _split
from proxy.upstream import CONNECT_ERRORS
from tests.support.garbage import cyclic_garbage
from tests.support.ports import free_port
from tests.support.wait import wait_until_async

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def engine() -> AsyncIterator[tuple[TestServer, list[int]]]:
    """An engine that answers JSON and streams, and records each request's client port (and its
    connection, on the server: ``server.connections``)."""
    ports: list[int] = []
    connections: list[asyncio.BaseTransport] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        ports.append(request.transport.get_extra_info("peername")[1])
        connections.append(request.transport)
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"echo": body})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            await response.write(b"data: %d\n\n" % i)
        await response.write_eof()
        return response

    async def info(request: web.Request) -> web.Response:
        assert request.transport is not None
        ports.append(request.transport.get_extra_info("peername")[1])
        return web.json_response(
            {"content_length": request.headers.get("Content-Length"), "body": await request.text()}
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/distserve/engine_info", info)
    server = TestServer(app)
    server.connections = connections  # type: ignore[attr-defined]
    await server.start_server()
    yield server, ports
    await server.close()


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    pool = Pool(asyncio.get_running_loop(), 10)
    yield pool
    pool.close()


async def chat(pool: Pool, server: TestServer, body: bytes = b"{}") -> tuple[int, bytes]:
    response = await pool.request("POST", url(server), body, JSON, connect=2, total=10)
    return response.status, await response.read()


def url(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}/v1/chat/completions"


async def test_a_get_without_a_body_sends_none_and_keeps_its_connection(engine, pool):
    # LMDeploy's link starts with GET /distserve/engine_info (proxy.pd.lmdeploy).
    server, ports = engine
    info = f"http://127.0.0.1:{server.port}/distserve/engine_info"
    response = await pool.request("GET", info, None, {}, connect=2, total=10)
    assert (response.status, await response.read()) == (200, b'{"content_length": null, "body": ""}')
    assert await chat(pool, server) == (200, b'{"echo": {}}')
    assert len(set(ports)) == 1


async def test_requests_reuse_one_kept_alive_connection(engine, pool):
    server, ports = engine
    for i in range(5):
        assert await chat(pool, server, b'{"n": %d}' % i) == (200, b'{"echo": {"n": %d}}' % i)
    assert len(set(ports)) == 1


async def test_a_request_after_the_engine_closed_the_idle_connection_succeeds(engine, pool):
    server, ports = engine
    assert await chat(pool, server) == (200, b'{"echo": {}}')
    server.connections[0].close()  # the engine closes the idle connection (its keep-alive timeout)
    await wait_until_async(lambda: not pool.open, 2, "the pool never saw the engine close the connection")
    assert await chat(pool, server) == (200, b'{"echo": {}}')
    assert len(set(ports)) == 2


async def test_a_stream_arrives_chunk_by_chunk_and_ends(engine, pool):
    server, _ = engine
    response = await pool.request("POST", url(server), b'{"stream": true}', JSON, connect=2, total=10)
    assert response.content_type == "text/event-stream"
    assert response.header(b"content-type") == b"text/event-stream"
    chunks = [chunk async for chunk in response.content.iter_any()]
    assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_events_that_arrived_together_are_handed_over_in_one_piece(pool):
    # An engine writes each event as a chunk of its own; those already there when the relay reads
    # again go on as one write to the client, not one each (and the parts are still counted, for
    # the mean gap between events).
    go_on = asyncio.Event()

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await go_on.wait()
        for i in range(5):
            await response.write(b"data: %d\n\n" % i)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = TestServer(app)
    await server.start_server()
    try:
        response = await pool.request("POST", url(server), b"{}", JSON, connect=2, total=10)
        assert await response.content.readany() == b"data: first\n\n"
        go_on.set()
        await wait_until_async(lambda: response.complete, 2, "the engine never finished its stream")
        assert await response.content.readany() == b"".join(b"data: %d\n\n" % i for i in range(5))
        assert await response.content.readany() == b""
        assert response.parts == 6
    finally:
        await server.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_answers_are_freed_as_soon_as_they_were_read(engine, pool, stream):
    # No reference cycle keeps an answer (and its bytes) alive until the cyclic garbage collector
    # runs: that is CPU on every request and memory held under load.
    server, _ = engine
    body = b'{"stream": true}' if stream else b"{}"
    with cyclic_garbage() as left:
        for _ in range(20):
            response = await pool.request("POST", url(server), body, JSON, connect=2, total=10)
            if stream:
                assert b"".join([chunk async for chunk in response.content.iter_any()]).count(b"data:") == 3
            else:
                assert await response.read() == b'{"echo": {}}'
        del response
    assert [kind.__name__ for kind in left if kind.__module__.startswith("proxy.httpclient.")] == []


async def test_a_request_cancelled_while_handed_a_free_slot_passes_it_on(engine):
    # A full pool (limit 1): two requests wait; the slot freed goes to the first, which its client
    # cancels before it resumes. The second must get the slot, not wait for another to free up.
    server, _ = engine
    pool = Pool(asyncio.get_running_loop(), 1)
    key = _split(url(server))[0]
    try:
        held = await pool._connection(key, 2)
        first = asyncio.create_task(pool._connection(key, 2))
        second = asyncio.create_task(pool._connection(key, 2))
        await wait_until_async(lambda: len(pool.slot_waiters) == 2, 2, "the two requests never waited for a slot")
        held.abort()  # the slot is free: handed to the first waiter
        first.cancel()
        conn = await asyncio.wait_for(second, 2)
        assert conn in pool.open
        with pytest.raises(asyncio.CancelledError):
            await first
    finally:
        pool.close()


async def test_a_node_that_cannot_be_reached_raises_a_connect_error():
    pool = Pool(asyncio.get_running_loop(), 10)
    with pytest.raises(CONNECT_ERRORS):
        await pool.request(
            "POST", f"http://127.0.0.1:{free_port()}/v1/chat/completions", b"{}", JSON, connect=2, total=10
        )
    pool.close()


async def test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent(engine):
    server, ports = engine
    pool = Pool(asyncio.get_running_loop(), 10)
    with pytest.raises(ValueError):
        await pool.request("POST", url(server), b"{}", {"X-Request-Id": "a\r\nX-Evil: 1"}, connect=2, total=10)
    assert ports == []
    pool.close()


async def test_the_total_timeout_ends_a_request_the_engine_never_answers():
    async def hang(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", hang)
    server = TestServer(app)
    await server.start_server()
    pool = Pool(asyncio.get_running_loop(), 10)
    try:
        with pytest.raises(TimeoutError):
            await pool.request("POST", url(server), b"{}", JSON, connect=2, total=0.2)
        assert not pool.open  # the connection was closed, never to be reused
    finally:
        pool.close()
        await server.close()


def test_the_client_errors_are_aiohttps():
    assert issubclass(aiohttp.ClientOSError, CONNECT_ERRORS)
