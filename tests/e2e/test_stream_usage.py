"""Streams whose client did not ask for usage: RouterPanel asks the engine for it (to count the key's
tokens) and takes the usage chunk out, so the client gets byte for byte what the engine sends a
client that did not ask (docs/usage.md)."""

from __future__ import annotations

import re
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


def _same_ids(stream: bytes) -> bytes:
    """The stream with its answer's id spelled one way: engines other than vLLM draw a new id for
    every answer (vLLM names it after the X-Request-Id), so two answers differ there anyway."""
    return re.sub(rb'"id": ?"(chatcmpl|cmpl)-[^"]*"', rb'"id":"\1-x"', stream)


@pytest.mark.parametrize("engine", ["vllm", "sglang", "lmdeploy", "nanodeploy"])
@pytest.mark.parametrize(
    ("path", "prompt"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "tell me something"}]}),
        ("/v1/completions", {"prompt": "tell me something"}),
    ],
)
def test_a_stream_through_routerpanel_is_the_engines_stream_without_the_usage_it_took(
    stack, engine, path, prompt
) -> None:
    model = f"usage-bytes-{engine}"
    with run_simulator(engine=engine, served_model_name=model, extra_args=[f"--created={CREATED}"]) as sim:
        stack.add_live_node(sim.url, [model], engine_type=engine)
        name = f"usage-{engine}" + path.replace("/", "-")
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
    assert not re.search(rb'"usage": ?\{', direct.content)  # SGLang's completion chunks carry "usage":null
    assert _same_ids(through.content) == _same_ids(direct.content)
    if engine == "vllm":
        assert through.content == direct.content
        assert b'"system_fingerprint"' in direct.content  # vLLM's, moved back where it was
    assert asked["stream_options"] == {"include_usage": True}  # RouterPanel asked the engine for usage
    if engine == "lmdeploy":  # which also adds "usage": null to every other chunk when asked
        assert with_usage.content.count(b'"usage": null') == direct.content.count(b"\n\n") - 1
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


def _without_usage_event(stream: bytes) -> bytes:
    events = stream.split(b"\n\n")
    return b"\n\n".join(e for e in events if not re.search(rb'"usage": ?\{', e))


def test_a_pd_stream_is_counted_with_the_prefills_prompt_tokens_and_shown_without_usage(stack) -> None:
    """The demo fleet's ``demo-pd`` pair (a NanoDeploy prefill and decode engine): the decode is
    asked for usage the client did not ask for; the key is counted what a client that asked is told
    (prompt tokens from the prefill, completion tokens from the decode)."""
    model = "demo-pd"
    common = {"engine": "nanodeploy", "served_model_name": model, "model_path": "/models/demo-pd-8B"}
    with (
        run_simulator(role="prefill", extra_args=[f"--created={CREATED}"], **common) as prefill,
        run_simulator(role="decode", extra_args=[f"--created={CREATED}"], **common) as decode,
    ):
        stack.add_node(prefill.url, [model], role="prefill", engine_type="nanodeploy", settle=False)
        stack.add_node(decode.url, [model], role="decode", engine_type="nanodeploy", settle=False)
        stack.set_policy(model, serving_mode="pd", settle=False)
        tokens = {}
        streams = {}
        for name, extra in (("pd-plain", {}), ("pd-asked", {"stream_options": {"include_usage": True}})):
            token = stack.add_key(name=name)
            body = {"model": model, "messages": [{"role": "user", "content": "four words of prompt"}]}
            body |= {"stream": True, "max_tokens": 6, **extra}
            headers = {"Authorization": f"Bearer {token}"}
            answer = httpx.post(stack.base + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert answer.status_code == 200, answer.text
            assert "decode=" in answer.headers["x-routerpanel-node"]  # served by the pair
            streams[name] = answer.content
            tokens[name] = _key_id(stack, name)
        asked = next(r["body"] for r in decode.requests() if "messages" in (r["body"] or {}))  # the first decode
    assert asked["stream_options"] == {"include_usage": True}
    assert not re.search(rb'"usage": ?\{', streams["pd-plain"])
    assert _same_ids(streams["pd-plain"]) == _same_ids(_without_usage_event(streams["pd-asked"]))
    usage = next(e for e in streams["pd-asked"].split(b"\n\n") if b'"usage"' in e)
    told = live_budgets.tokens_in(usage)
    assert told > 6

    client = redis.Redis.from_url(stack.redis_url)
    day = keys.tokens_day_key(live_budgets.day_of(time.time()))
    wait_until(
        lambda: [int(client.hget(day, str(tokens[name])) or 0) for name in ("pd-plain", "pd-asked")] == [told, told],
        5,
        lambda: f"the keys' tokens: {client.hmget(day, [str(tokens['pd-plain']), str(tokens['pd-asked'])])} != {told}",
    )
