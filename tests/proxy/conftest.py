"""Fixtures for in-process tests of the data path: a scriptable fake engine (aiohttp server on a
real socket), a driver that calls the ASGI app directly, and a proxy app on a fixed snapshot."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import snapshot as snapshots
from proxy.app import ProxyApp
from proxy.load import KeyLimiter
from proxy.router import Router
from proxy.upstream import close_session


@dataclass
class FakeEngine:
    """An OpenAI-ish engine whose behaviour a test sets: ``mode`` is ``ok``, ``status:<code>``,
    ``hang`` (never answers), ``hang_stream`` (headers and one chunk, then nothing),
    ``slow_first_token`` (headers at once, the first chunk 0.5 s later) or ``break_stream`` (drops
    the connection after two chunks)."""

    name: str
    mode: str = "ok"
    chunks: int = 4
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[Any] = field(default_factory=list)
    cancelled: int = 0
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        self.headers.append(request.headers.copy())
        try:
            if self.mode.startswith("status:"):
                status = int(self.mode.split(":")[1])
                error = {"error": {"message": f"{self.name} says {status}", "type": "engine", "code": status}}
                return web.json_response(error, status=status)
            if self.mode == "hang":
                await asyncio.Event().wait()
            if body.get("stream"):
                return await self._stream(request, body)
            return web.json_response(
                {"object": "chat.completion", "model": body["model"], "engine": self.name, "echo": body}
            )
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.mode == "slow_first_token":
            await asyncio.sleep(0.5)
        for i in range(self.chunks):
            event = {"object": "chat.completion.chunk", "engine": self.name, "i": i, "model": body["model"]}
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            if self.mode == "hang_stream":
                await asyncio.Event().wait()
            if self.mode == "break_stream" and i == 1:
                assert request.transport is not None
                request.transport.abort()
                return response
            await asyncio.sleep(0)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
async def engines() -> AsyncIterator[Callable[..., Any]]:
    """Factory: ``await engines("a")`` starts a fake engine (on ``port`` or a free one); all stop at teardown."""
    started: list[FakeEngine] = []

    async def start(name: str, port: int | None = None, **options: Any) -> FakeEngine:
        engine = FakeEngine(name=name, **options)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", engine.handle)
        app.router.add_post("/v1/completions", engine.handle)
        engine.server = TestServer(app, host="127.0.0.1", port=port)
        await engine.server.start_server()
        started.append(engine)
        return engine

    yield start
    await close_session()
    for engine in started:
        assert engine.server is not None
        await engine.server.close()


class StaticWatcher:
    """Stands in for ``SnapshotWatcher``: the test installs snapshots itself."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def ensure_started(self) -> None:  # pragma: no cover - loop always matches
        return None

    async def stop(self) -> None:
        return None


@pytest.fixture
async def proxy_app() -> AsyncIterator[ProxyApp]:
    """A fresh proxy app (own counters and limiter) serving whatever snapshot the test installed."""
    previous = snapshots.current()
    yield ProxyApp(router=Router(), watcher=StaticWatcher(), limiter=KeyLimiter())  # type: ignore[arg-type]
    snapshots.install(previous)
    await close_session()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    chunks: list[bytes]

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: Any,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    disconnect_after_chunks: int | None = None,
    disconnect_after: float | None = None,
) -> Response:
    """Call the ASGI app like a server would; optionally disconnect after some chunks or seconds."""
    if body is None:
        body = b"" if json_body is None else json.dumps(json_body).encode()
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    raw_headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": method, "path": path, "headers": raw_headers, "query_string": b""}
    gone = asyncio.Event()
    sent_body = False
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        chunks = [m for m in messages if m["type"] == "http.response.body" and m.get("body")]
        if disconnect_after_chunks is not None and len(chunks) >= disconnect_after_chunks:
            gone.set()

    timer = None
    if disconnect_after is not None:
        timer = asyncio.get_running_loop().call_later(disconnect_after, gone.set)
    try:
        await app(scope, receive, send)
    finally:
        gone.set()
        if timer is not None:
            timer.cancel()
    start = next((m for m in messages if m["type"] == "http.response.start"), None)
    chunks = [m.get("body", b"") for m in messages if m["type"] == "http.response.body"]
    return Response(
        status=start["status"] if start else 0,
        headers={k.decode(): v.decode() for k, v in start["headers"]} if start else {},
        body=b"".join(chunks),
        chunks=[c for c in chunks if c],
    )


API_KEY = "rp-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def make_snapshot(
    nodes: list[dict[str, Any]],
    *,
    global_aliases: tuple[tuple[str, str], ...] = (),
    policies: dict[str, snapshots.PolicyView] | None = None,
    default_policy: snapshots.PolicyView | None = None,
    keys: dict[str, dict[str, Any]] | None = None,
    version: int = 1,
) -> snapshots.Snapshot:
    """A snapshot without the database. Each node dict has ``url`` and ``models`` (served names,
    optionally ``{"name": alias, ...}`` mappings via ``aliases``) plus any ``NodeView`` field.
    ``keys`` maps plaintext to ``KeyView`` options; by default one key, ``API_KEY``, allows all."""
    from nodes.models import hash_api_key

    views: dict[int, snapshots.NodeView] = {}
    alias_rows: list[tuple[int | None, str, str]] = []
    for node_id, spec in enumerate(nodes, start=1):
        spec = dict(spec)
        served = spec.pop("models", ["m"])
        extra_aliases = spec.pop("aliases", {})
        spec.setdefault("engine_type", "openai")
        spec.setdefault("role", "hybrid")
        spec.setdefault("state", "active")
        spec.setdefault("health", "healthy")
        views[node_id] = snapshots.NodeView(id=node_id, **spec)
        alias_rows += [(node_id, name, name) for name in served]
        alias_rows += [(node_id, name, target) for name, target in extra_aliases.items()]
    alias_rows += [(None, name, served) for name, served in global_aliases]
    default = default_policy or snapshots.PolicyView()
    routes = snapshots.build_routes(views, alias_rows, policies or {}, default)
    key_specs = {API_KEY: {}} if keys is None else keys
    key_views = {
        hash_api_key(plain): snapshots.KeyView(
            id=i,
            name=f"key{i}",
            allowed_models=frozenset(opts.get("allowed_models", ())),
            **{k: v for k, v in opts.items() if k != "allowed_models"},
        )
        for i, (plain, opts) in enumerate(key_specs.items(), start=1)
    }
    return snapshots.Snapshot(
        version=version,
        built_at=0.0,
        nodes=views,
        routes=routes,
        keys=key_views,
        default_policy=default,
        models=tuple(sorted(n for n, r in routes.items() if r.servable)),
    )
