"""Fake NanoDeploy prefill and decode engines for in-process PD tests.

They share one KV ledger and behave like the real engines: KV is allocated when a prefill starts,
held until ``/pd/free``, and kept when the prefill's caller goes away. ``fail`` makes a server
answer an error status for its next calls.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import pd as pd_module
from tests.support.wait import wait_until_async

CHAT = "/v1/chat/completions"


@dataclass
class FakePdEngines:
    prefill_delay: float = 0.06
    decode_chunks: int = 8
    chunk_delay: float = 0.01
    held: set[int] = field(default_factory=set)
    allocated: int = 0
    freed: int = 0
    double_frees: int = 0
    free_calls: list[list[int]] = field(default_factory=list)  # the seq_ids of each /pd/free call
    prefill_cancelled: int = 0
    decodes: int = 0
    calls: dict[str, int] = field(default_factory=dict)  # inference calls per server URL
    failures: dict[str, list[int]] = field(default_factory=dict)  # statuses to answer next, per URL
    ids: itertools.count = field(default_factory=lambda: itertools.count(1024))

    def fail(self, url: str, *statuses: int) -> None:
        self.failures.setdefault(url, []).extend(statuses)

    def _take_failure(self, request: web.Request) -> web.Response | None:
        url = f"http://127.0.0.1:{request.url.port}"
        self.calls[url] = self.calls.get(url, 0) + 1
        pending = self.failures.get(url)
        if pending:
            status = pending.pop(0)
            return web.json_response(
                {"error": {"message": f"fake {status}", "type": "x", "code": status}}, status=status
            )
        return None

    async def prefill(self, request: web.Request) -> web.Response:
        body = await request.json()
        assert body["kv_transfer_params"] == {"do_remote_decode": True} and body["stream"] is False
        failure = self._take_failure(request)
        if failure is not None:
            return failure
        seq_id = next(self.ids)
        self.held.add(seq_id)
        self.allocated += 1
        try:
            await asyncio.sleep(self.prefill_delay)
        except asyncio.CancelledError:
            self.prefill_cancelled += 1  # the KV stays held: nobody learns its seq_id
            raise
        params = {"migration": "bWln", "seq_id": seq_id, "first_token": 7}
        usage = {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
        return web.json_response({"choices": [], "usage": usage, "kv_transfer_params": params})

    async def free(self, request: web.Request) -> web.Response:
        """Like DLEngine: the release is queued and the answer echoes the ids it was given."""
        seq_ids = (await request.json())["seq_ids"]
        self.free_calls.append(seq_ids)
        for seq_id in seq_ids:
            if seq_id in self.held:
                self.held.discard(seq_id)
                self.freed += 1
            else:
                self.double_frees += 1
        return web.json_response({"freed": seq_ids})

    async def decode(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["kv_transfer_params"]["seq_id"] in self.held
        failure = self._take_failure(request)
        if failure is not None:
            return failure
        self.decodes += 1
        usage = {"prompt_tokens": 1, "completion_tokens": self.decode_chunks, "total_tokens": 1 + self.decode_chunks}
        if not body.get("stream"):
            await asyncio.sleep(self.chunk_delay * self.decode_chunks)
            return web.json_response({"choices": [{"index": 0, "message": {"content": "ok"}}], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(self.decode_chunks):
            event = {"choices": [{"delta": {"content": str(i)}}]}
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await asyncio.sleep(self.chunk_delay)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


StartPd = Callable[..., Awaitable[tuple[FakePdEngines, list[str], list[str]]]]


@pytest.fixture
async def fake_pd() -> AsyncIterator[StartPd]:
    """Factory: ``engines, prefill_urls, decode_urls = await fake_pd(prefills=1, decodes=1)``."""
    servers: list[TestServer] = []

    async def start(prefills: int = 1, decodes: int = 1) -> tuple[FakePdEngines, list[str], list[str]]:
        engines = FakePdEngines()
        urls: dict[str, list[str]] = {"prefill": [], "decode": []}
        for role, count in (("prefill", prefills), ("decode", decodes)):
            for _ in range(count):
                app = web.Application()
                if role == "prefill":
                    app.router.add_post(CHAT, engines.prefill)
                    app.router.add_post("/pd/free", engines.free)
                else:
                    app.router.add_post(CHAT, engines.decode)
                server = TestServer(app, host="127.0.0.1")
                await server.start_server()
                servers.append(server)
                urls[role].append(f"http://127.0.0.1:{server.port}")
        return engines, urls["prefill"], urls["decode"]

    yield start
    for server in servers:
        await server.close()


def pd_nodes(prefill_urls: list[str], decode_urls: list[str]) -> list[dict]:
    """``make_snapshot`` node specs for NanoDeploy prefill and decode nodes serving ``m``."""
    return [
        *({"url": u, "models": ["m"], "role": "prefill", "engine_type": "nanodeploy"} for u in prefill_urls),
        *({"url": u, "models": ["m"], "role": "decode", "engine_type": "nanodeploy"} for u in decode_urls),
    ]


async def settled(proxy_app) -> None:
    """Wait (bounded) until every PD clean-up ran and no counter is held."""
    await wait_until_async(
        lambda: not (pd_module.pending_cleanups() or pd_module.inflight() or proxy_app.router.load.counts()),
        10,
        "a PD clean-up or a counter is still pending",
    )
