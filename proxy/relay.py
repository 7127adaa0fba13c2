"""Relaying an engine's answer to the client, and the request/outcome types the PD path shares.

``ProxyRequest`` is a parsed client request, ``Outcome`` what happened to it (for metrics), and
``relay_stream`` passes an engine's SSE stream through byte for byte, ending with an OpenAI-shaped
error event and ``[DONE]`` if the engine fails after the stream started.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from . import sse
from .errors import engine_failed, engine_timeout
from .snapshot import Route, Target
from .transport import DisconnectWatcher, RequestHeaders, Send


@dataclass(slots=True)
class ProxyRequest:
    path: str
    model: str
    route: Route
    payload: dict[str, Any]
    body: bytes
    stream: bool
    request_id: str
    headers: RequestHeaders
    rewritten: dict[str, bytes] = field(default_factory=dict)

    def body_for(self, served_name: str) -> bytes:
        """The client's bytes unchanged when the node serves the requested name; otherwise the
        same JSON with only ``model`` replaced (key order and every other field kept)."""
        if served_name == self.model:
            return self.body
        body = self.rewritten.get(served_name)
        if body is None:
            rewritten = {**self.payload, "model": served_name}
            body = json.dumps(rewritten, ensure_ascii=False, separators=(",", ":")).encode()
            self.rewritten[served_name] = body
        return body


@dataclass(slots=True)
class Outcome:
    """What happened, for metrics."""

    status: int = 0
    node: str = "-"
    ttft: float | None = None
    mean_gap: float | None = None
    error: str | None = None


def response_headers(request: ProxyRequest, target: Target) -> list[tuple[bytes, bytes]]:
    return [(b"x-request-id", request.request_id.encode("latin-1")), (b"x-routerpanel-node", target.node.url.encode())]


async def relay_stream(
    request: ProxyRequest,
    send: Send,
    response: aiohttp.ClientResponse,
    first: bytes,
    target: Target,
    watcher: DisconnectWatcher,
    outcome: Outcome,
    started: float,
) -> None:
    """Send the engine's SSE bytes as they arrive; end with an error event if the engine fails."""
    headers = [(b"content-type", response.headers.get("Content-Type", "text/event-stream").encode("latin-1"))]
    headers += sse.STREAM_HEADERS
    headers += response_headers(request, target)
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    outcome.status = 200
    first_at = time.perf_counter()
    last_at = first_at
    chunks = 0
    last = first
    try:
        if first:
            outcome.ttft = first_at - started
            await send({"type": "http.response.body", "body": first, "more_body": True})
            chunks = 1
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                last = chunk
                chunks += 1
            last_at = time.perf_counter()
    except (aiohttp.ClientError, TimeoutError) as exc:
        if isinstance(exc, TimeoutError):
            error = engine_timeout("The engine did not finish the stream within the policy's timeout.")
        else:
            error = engine_failed(f"The engine failed mid-stream: {exc}", "engine_stream_error")
        outcome.error = error.code
        await send({"type": "http.response.body", "body": sse.error_event(error, after=last), "more_body": True})
    if chunks > 1:
        outcome.mean_gap = (last_at - first_at) / (chunks - 1)
    watcher.finish()
    await send({"type": "http.response.body", "body": b"", "more_body": False})
