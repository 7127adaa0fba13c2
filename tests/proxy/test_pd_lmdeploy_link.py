"""LMDeploy's p2p link as RouterPanel makes it (``proxy.pd.lmdeploy.Links``), against fake engines
that answer as LMDeploy does: once per pair however many requests arrive together, retried when an
engine did not answer properly (5xx), never when it refused the body (4xx)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.errors import ProxyError
from proxy.pd.core import Leg, PdRequest
from proxy.pd.lmdeploy import Links
from proxy.snapshot import NodeView, PolicyView, Target
from proxy.upstream import close_session

CONFIG = {
    "tp_size": 1,
    "ep_size": 1,
    "dp_size": 1,
    "pp_size": None,
    "dp_rank": 0,
    "block_size": 64,
    "num_cpu_blocks": 0,
    "num_gpu_blocks": 100,
}


class FakeLmdeploy:
    """One engine: counts each step and fails the next ``fail[step]`` calls with ``status``."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {"engine_info": 0, "p2p_initialize": 0, "p2p_connect": 0}
        self.fail: dict[str, list[int]] = {}
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/distserve/engine_info", self.step("engine_info"))
        app.router.add_post("/distserve/p2p_initialize", self.step("p2p_initialize"))
        app.router.add_post("/distserve/p2p_connect", self.step("p2p_connect"))
        return app

    def step(self, name: str):
        async def handler(request: web.Request) -> web.Response:
            self.calls[name] += 1
            await asyncio.sleep(0.01)
            pending = self.fail.get(name)
            if pending:
                return web.json_response({"message": "no", "object": "error"}, status=pending.pop(0))
            if name == "engine_info":
                return web.json_response(json.dumps(CONFIG))  # a JSON string of JSON, as LMDeploy answers
            if name == "p2p_initialize":
                endpoint = {"protocol": 2, "endpoint_info": json.dumps({"engine": self.url})}
                return web.json_response(
                    {
                        "status": 1,
                        "engine_endpoint_info": {"zmq_address": "tcp://127.0.0.1:5555"},
                        "kvtransfer_endpoint_info": [endpoint],
                    }
                )
            return web.json_response({"status": 1})

        return handler


@pytest.fixture
async def engines() -> AsyncIterator[tuple[FakeLmdeploy, FakeLmdeploy]]:
    fakes = (FakeLmdeploy(), FakeLmdeploy())
    servers = []
    for fake in fakes:
        server = TestServer(fake.app(), host="127.0.0.1")
        await server.start_server()
        fake.url = f"http://127.0.0.1:{server.port}"
        servers.append(server)
    yield fakes
    await close_session()
    for server in servers:
        await server.close()


def leg(url: str, role: str) -> Leg:
    node = NodeView(id=hash(url) % 1000, url=url, engine_type="lmdeploy", role=role, state="active", health="healthy")
    return Leg(role, Target(node, "m"))


def fake_pd() -> SimpleNamespace:
    pd = SimpleNamespace(policy=PolicyView())
    pd.call_json = lambda *args, **kwargs: PdRequest.call_json(pd, *args, **kwargs)
    return pd


async def test_concurrent_first_requests_of_a_pair_share_one_handshake(engines):
    prefill, decode = engines
    links = Links()
    p, d = leg(prefill.url, "prefill"), leg(decode.url, "decode")
    await asyncio.gather(*(links.ensure(fake_pd(), p, d) for _ in range(5)))
    await links.ensure(fake_pd(), p, d)
    for fake in engines:
        assert fake.calls == {"engine_info": 1, "p2p_initialize": 1, "p2p_connect": 1}
    links.forget(p.url, d.url)
    await links.ensure(fake_pd(), p, d)
    assert prefill.calls["p2p_initialize"] == 2


async def test_a_step_that_failed_with_a_5xx_is_retried_with_the_whole_handshake(engines):
    prefill, decode = engines
    decode.fail["p2p_connect"] = [500, 503]
    await Links().ensure(fake_pd(), leg(prefill.url, "prefill"), leg(decode.url, "decode"))
    assert decode.calls["p2p_connect"] == 3 and prefill.calls["engine_info"] == 3


async def test_a_refused_body_is_not_retried(engines):
    prefill, decode = engines
    prefill.fail["p2p_initialize"] = [400]
    with pytest.raises(ProxyError) as caught:
        await Links().ensure(fake_pd(), leg(prefill.url, "prefill"), leg(decode.url, "decode"))
    assert caught.value.code == "pd_connect_failed" and "400" in caught.value.message
    assert prefill.calls["p2p_initialize"] == 1 and decode.calls["p2p_initialize"] == 0
