"""Streams whose client did not ask for usage: RouterPanel asks the engine for it (to count the key's
tokens) and takes the usage chunk out, so the client gets byte for byte what the engine sends a
client that did not ask (docs/usage.md)."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from enginesim.testing import run_simulator
from nodes.live import budgets as live_budgets
from nodes.live import keys
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

CREATED = 1_700_000_000  # the simulator's fixed ``created``: its answers compare byte for byte


def _key_id(stack, name: str) -> int:
    rows = stack.api.get("/api/api-keys/", params={"limit": 1000}).json()["results"]
    return next(row["id"] for row in rows if row["name"] == name)


@pytest.mark.parametrize(
    ("path", "prompt"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "tell me something"}]}),
        ("/v1/completions", {"prompt": "tell me something"}),
    ],
)
def test_a_stream_through_routerpanel_is_the_engines_stream_without_the_usage_it_took(stack, path, prompt) -> None:
    model = "usage-bytes"
    with run_simulator(engine="vllm", served_model_name=model, extra_args=[f"--created={CREATED}"]) as sim:
        stack.add_node(sim.url, [model], engine_type="vllm")
        name = "usage" + path.replace("/", "-")
        token = stack.add_key(name=name)
        key_id = _key_id(stack, name)
        body = {"model": model, **prompt, "stream": True, "max_tokens": 7, "temperature": 0}
        request_id = {"X-Request-Id": f"same-{name}"}  # vLLM names its chunks after it

        direct = httpx.post(sim.url + path, json=body, headers=request_id, timeout=30)
        through = httpx.post(
            stack.base + path, json=body, headers={**request_id, "Authorization": f"Bearer {token}"}, timeout=30
        )
        asked = sim.requests()[-1]["body"]
        with_usage = httpx.post(
            sim.url + path, json={**body, "stream_options": {"include_usage": True}}, headers=request_id, timeout=30
        )
    assert direct.status_code == through.status_code == 200
    assert b'"usage"' not in direct.content
    assert through.content == direct.content
    assert asked["stream_options"] == {"include_usage": True}  # RouterPanel asked the engine for usage
    usage = with_usage.content.split(b"\n\n")[-3]  # the usage chunk, before [DONE]
    tokens = live_budgets.tokens_in(usage)
    assert tokens > 7

    client = redis.Redis.from_url(stack.redis_url)
    day = keys.tokens_day_key(live_budgets.day_of(time.time()))
    wait_until(
        lambda: int(client.hget(day, str(key_id)) or 0) == tokens,
        5,
        lambda: f"the key's tokens were never counted: {client.hget(day, str(key_id))} != {tokens} ({usage!r})",
    )
