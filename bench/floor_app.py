"""The floors the proxy is compared with in ``make bench``: bare ASGI passthroughs.

No auth, routing, counters, metrics, retries or disconnect handling: each forwards the body to the
engine named for its model (``FLOOR_UPSTREAMS="model=url,..."``) and relays the answer, streaming or
not. ``app`` does it on aiohttp's client (the table's "floor" column); ``own_client_app`` on
RouterPanel's data-path client (``proxy.httpclient``), one of the layers ``make bench FLOORS=1``
sets side by side (bench/floors.py). What RouterPanel costs beyond a floor is the price of its
features; what a floor costs beyond DIRECT is the price of an extra hop on this machine.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from proxy.httpclient import Pool

UPSTREAMS = dict(item.split("=", 1) for item in os.environ.get("FLOOR_UPSTREAMS", "").split(",") if item)
_session: aiohttp.ClientSession | None = None
_pool: Pool | None = None

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _relay(send: Send, status: int, kind: bytes, stream: AsyncIterator[bytes] | None, data: bytes) -> None:
    headers = [(b"content-type", kind)]
    if stream is not None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    else:
        headers.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    global _session
    if scope["type"] != "http":
        return
    if _session is None:
        _session = aiohttp.ClientSession(auto_decompress=False)
    body = await _body(receive)
    upstream = UPSTREAMS[json.loads(body)["model"]]
    async with _session.post(upstream + scope["path"], data=body, headers={"Content-Type": "application/json"}) as r:
        kind = r.headers.get("Content-Type", "application/json").encode()
        if r.content_type == "text/event-stream":
            await _relay(send, r.status, kind, r.content.iter_any(), b"")
        else:
            await _relay(send, r.status, kind, None, await r.read())


async def own_client_app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    global _pool
    if scope["type"] != "http":
        return
    if _pool is None:
        _pool = Pool(asyncio.get_running_loop(), 0)
    body = await _body(receive)
    upstream = UPSTREAMS[json.loads(body)["model"]]
    headers = {"Content-Type": "application/json"}
    r = await _pool.request("POST", upstream + scope["path"], body, headers, connect=5.0, total=60.0)
    kind = r.header(b"content-type", b"application/json")
    if r.content_type == "text/event-stream":
        await _relay(send, r.status, kind, r.content.iter_any(), b"")
    else:
        await _relay(send, r.status, kind, None, await r.read())
