"""A client that leaves at any moment of a NanoDeploy PD request: in-process, with fake prefill and
decode engines that keep a KV ledger the way the real engine does (KV allocated when the prefill
starts, held until ``/pd/free``, kept when the prefill's caller goes away)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import pd as pd_module
from proxy import snapshot as snapshots
from proxy.snapshot import PolicyView

from .conftest import AUTH, call, make_snapshot

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
    prefill_cancelled: int = 0
    decodes: int = 0
    ids: itertools.count = field(default_factory=lambda: itertools.count(1024))

    async def prefill(self, request: web.Request) -> web.Response:
        body = await request.json()
        assert body["kv_transfer_params"] == {"do_remote_decode": True} and body["stream"] is False
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
        freed = []
        for seq_id in (await request.json())["seq_ids"]:
            if seq_id in self.held:
                self.held.discard(seq_id)
                self.freed += 1
                freed.append(seq_id)
            else:
                self.double_frees += 1
        return web.json_response({"freed": freed})

    async def decode(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["kv_transfer_params"]["seq_id"] in self.held
        self.decodes += 1
        if not body.get("stream"):
            await asyncio.sleep(self.chunk_delay * self.decode_chunks)
            return web.json_response({"choices": [{"index": 0, "message": {"content": "ok"}}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(self.decode_chunks):
            await response.write(
                b"data: " + json.dumps({"choices": [{"delta": {"content": str(i)}}]}).encode() + b"\n\n"
            )
            await asyncio.sleep(self.chunk_delay)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
async def fake_pd() -> AsyncIterator[tuple[FakePdEngines, str, str]]:
    engines = FakePdEngines()
    prefill_app = web.Application()
    prefill_app.router.add_post(CHAT, engines.prefill)
    prefill_app.router.add_post("/pd/free", engines.free)
    decode_app = web.Application()
    decode_app.router.add_post(CHAT, engines.decode)
    servers = [TestServer(prefill_app, host="127.0.0.1"), TestServer(decode_app, host="127.0.0.1")]
    for server in servers:
        await server.start_server()
    yield engines, f"http://127.0.0.1:{servers[0].port}", f"http://127.0.0.1:{servers[1].port}"
    for server in servers:
        await server.close()


async def settled(proxy_app, engines: FakePdEngines) -> None:
    """Wait (bounded) until every clean-up ran and no counter is held."""
    async with asyncio.timeout(10):
        while pd_module.pending_cleanups() or pd_module.inflight() or proxy_app.router.load.counts():
            await asyncio.sleep(0.01)


# Moments the client leaves: at once, while the prefill computes, around its answer, during the
# decode stream, after the end (None: never).
MOMENTS = [0.0, 0.01, 0.03, 0.05, 0.07, 0.09, 0.12, 0.16, 0.25, None]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("leave_after", MOMENTS)
async def test_every_prefilled_kv_is_freed_exactly_once_whenever_the_client_leaves(
    fake_pd, proxy_app, stream, leave_after
):
    engines, prefill_url, decode_url = fake_pd
    snapshots.install(
        make_snapshot(
            [
                {"url": prefill_url, "models": ["m"], "role": "prefill", "engine_type": "nanodeploy"},
                {"url": decode_url, "models": ["m"], "role": "decode", "engine_type": "nanodeploy"},
            ],
            default_policy=PolicyView(serving_mode="pd", first_token_timeout=5.0, total_timeout=10.0),
        )
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": stream}
    response = await call(proxy_app, "POST", CHAT, json_body=body, headers=AUTH, disconnect_after=leave_after)
    await settled(proxy_app, engines)

    assert engines.allocated in (0, 1)
    assert engines.held == set(), "a prefilled KV block was never freed"
    assert engines.freed == engines.allocated and engines.double_frees == 0
    assert engines.prefill_cancelled == 0, "the prefill call was abandoned with its KV"
    if leave_after is None:
        assert response.status == 200
        assert response.headers["x-routerpanel-node"] == f"prefill={prefill_url}; decode={decode_url}"
        assert engines.decodes == 1
