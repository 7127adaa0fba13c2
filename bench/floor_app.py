"""The floor the proxy is compared with in ``make bench``: a bare ASGI passthrough on aiohttp's client.

No auth, routing, counters, metrics, retries or disconnect handling: it forwards the body to the
engine named for its model (``FLOOR_UPSTREAMS="model=url,..."``) and relays the answer, streaming or
not. What RouterPanel costs beyond this is the price of its features; what this costs beyond DIRECT
is the price of an extra hop on this machine.
"""

from __future__ import annotations

import json
import os

import aiohttp

UPSTREAMS = dict(item.split("=", 1) for item in os.environ.get("FLOOR_UPSTREAMS", "").split(",") if item)
_session: aiohttp.ClientSession | None = None


async def app(scope, receive, send) -> None:
    global _session
    if scope["type"] != "http":
        return
    if _session is None:
        _session = aiohttp.ClientSession(auto_decompress=False)
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    upstream = UPSTREAMS[json.loads(body)["model"]]
    async with _session.post(upstream + scope["path"], data=body, headers={"Content-Type": "application/json"}) as r:
        headers = [(b"content-type", r.headers.get("Content-Type", "application/json").encode())]
        if r.content_type == "text/event-stream":
            await send({"type": "http.response.start", "status": r.status, "headers": headers})
            async for chunk in r.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            data = await r.read()
            headers.append((b"content-length", str(len(data)).encode()))
            await send({"type": "http.response.start", "status": r.status, "headers": headers})
            await send({"type": "http.response.body", "body": data})
