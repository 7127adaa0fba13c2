"""Real vLLM (CPU build) spoken to directly, with no RouterPanel in between: proves the harness and
pins down the engine behaviour that RouterPanel's routing and PD code rely on (docs/real-engines.md).

Every test here uses the session's pair of servers (``vllm_pair``): ExampleConnector servers, which
answer plain requests like any hybrid server and also act as prefill and decode.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from tests.realengines.harness import (
    MAX_MODEL_LEN,
    VllmServer,
    kv_files,
    long_prompt,
    prefill_copy,
)
from tests.support.wait import wait_until

pytestmark = [pytest.mark.real_engine, pytest.mark.e2e]

RUNNING = "vllm:num_requests_running"
GENERATED = "vllm:generation_tokens_total"


def client(server: VllmServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)


def test_both_servers_list_their_model(vllm_pair: tuple[VllmServer, VllmServer]) -> None:
    for server in vllm_pair:
        models = client(server).models.list().data
        assert [m.id for m in models] == [server.model]
        assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN
        assert httpx.get(f"{server.url}/version").json() == {"version": "0.32.0"}


def test_completions_return_logprobs(vllm_pair: tuple[VllmServer, VllmServer]) -> None:
    for server in vllm_pair:
        done = client(server).completions.create(
            model=server.model, prompt="def hello(world):", max_tokens=6, logprobs=2
        )
        choice = done.choices[0]
        assert choice.finish_reason == "length"
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == 6
        assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs)
        assert done.usage.completion_tokens == 6


def test_chat_returns_content_and_logprobs(vllm_pair: tuple[VllmServer, VllmServer]) -> None:
    for server in vllm_pair:
        done = client(server).chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "Say hi"}],
            max_tokens=5,
            logprobs=True,
            top_logprobs=2,
        )
        assert done.choices[0].message.role == "assistant"
        assert done.choices[0].message.content
        assert [len(t.top_logprobs) for t in done.choices[0].logprobs.content] == [2] * 5
        assert done.usage.completion_tokens == 5


def test_streaming_chat_ends_with_a_usage_chunk(vllm_pair: tuple[VllmServer, VllmServer]) -> None:
    for server in vllm_pair:
        chunks = list(
            client(server).chat.completions.create(
                model=server.model,
                messages=[{"role": "user", "content": "Say hi"}],
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        *content, last = chunks
        assert "".join(c.choices[0].delta.content or "" for c in content)
        assert content[-1].choices[0].finish_reason == "length"
        assert last.choices == []
        assert last.usage.completion_tokens == 4


def test_a_prompt_over_the_context_length_is_vllms_400(vllm_pair: tuple[VllmServer, VllmServer]) -> None:
    server = vllm_pair[0]
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).completions.create(model=server.model, prompt=long_prompt("too long", 1000), max_tokens=2)
    error = caught.value.response.json()["error"]
    assert caught.value.status_code == 400
    assert error["type"] == "BadRequestError"
    assert error["code"] == 400
    assert error["param"] == "input_tokens"
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]


def test_a_client_disconnect_mid_stream_aborts_the_request(vllm_pair: tuple[VllmServer, VllmServer]) -> None:
    server = vllm_pair[1]
    request_id = f"disconnect-{uuid.uuid4().hex}"
    generated_before = server.metric(GENERATED)
    # Not a one-token prompt: on an ExampleConnector server that kills the engine (docs/real-engines.md).
    prompt = "def hello(world):"
    body = {"model": server.model, "prompt": prompt, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{server.url}/v1/completions", json=body, headers={"X-Request-Id": request_id}) as reply,
    ):
        assert reply.status_code == 200
        # Read on until the gauge, which follows the engine's stats a few hundred milliseconds
        # behind, shows the request (leaving the loop closes the stream in httpx).
        seen_running = False
        for events, _line in enumerate(reply.iter_lines()):
            if events % 5 == 4 and server.metric(RUNNING) == 1:
                seen_running = True
                break
        assert seen_running, "the stream ended before vllm:num_requests_running showed it"
    # Closing the response dropped the connection: vLLM notices and aborts the request.
    wait_until(lambda: server.metric(RUNNING) == 0, 30, "vllm:num_requests_running never went back to 0", interval=0.1)
    assert server.metric(GENERATED) - generated_before < 1500
    # With --enable-log-requests vLLM also says so: "Request cmpl-<X-Request-Id>-0 aborted."
    wait_until(
        lambda: any("aborted" in line and request_id in line for line in server.log().splitlines()),
        10,
        "no abort in vLLM's log",
        interval=0.1,
    )


def test_prefix_caching_is_on_and_counted(vllm_pair: tuple[VllmServer, VllmServer]) -> None:
    server = vllm_pair[0]
    prompt = long_prompt(f"prefix {uuid.uuid4().hex}")
    names = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")
    before = server.metric_values(*names)
    first = client(server).completions.create(model=server.model, prompt=prompt, max_tokens=1)
    middle = server.metric_values(*names)
    client(server).completions.create(model=server.model, prompt=prompt, max_tokens=1)
    after = server.metric_values(*names)
    prompt_tokens = first.usage.prompt_tokens
    assert middle["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"] == prompt_tokens
    assert middle["vllm:prefix_cache_hits_total"] == before["vllm:prefix_cache_hits_total"]
    # The second time every whole 128-token block of the prompt comes from the cache.
    hits = after["vllm:prefix_cache_hits_total"] - middle["vllm:prefix_cache_hits_total"]
    assert hits == (prompt_tokens - 1) // 128 * 128 > 0


def external_kv_tokens(server: VllmServer) -> float:
    return server.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer")


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_pd_with_the_example_connector_loads_the_prefill_kv_on_decode(
    vllm_pair: tuple[VllmServer, VllmServer], vllm_kv_dir: Path, stream: bool
) -> None:
    prefill, decode = vllm_pair
    request_id = f"pd-{uuid.uuid4().hex}"
    headers = {"X-Request-Id": request_id}
    body = {
        "model": prefill.model,
        "prompt": long_prompt(request_id),
        "max_tokens": 8,
        "min_tokens": 8,
        "ignore_eos": True,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }
    files_before = set(kv_files(vllm_kv_dir))
    decode_external_before = external_kv_tokens(decode)

    # Prefill leg: vLLM answers with a `kv_transfer_params` key, null for this connector.
    first = httpx.post(f"{prefill.url}/v1/completions", json=prefill_copy(body), headers=headers, timeout=120)
    assert first.status_code == 200, first.text
    assert "kv_transfer_params" in first.json()
    assert first.json()["kv_transfer_params"] is None
    prompt_tokens = first.json()["usage"]["prompt_tokens"]
    new_files = set(kv_files(vllm_kv_dir)) - files_before
    layers = json.loads((prefill.model_path / "config.json").read_text())["num_hidden_layers"]
    assert len({name.split("/")[0] for name in new_files}) == 1  # one folder per prompt (hash of its tokens)
    assert sorted(name.split("/")[1] for name in new_files) == sorted(
        f"model.layers.{i}.self_attn.attn.safetensors" for i in range(layers)
    )

    # Decode leg: the same body (no kv_transfer_params came back to pass on), the same request id.
    if stream:
        with httpx.stream("POST", f"{decode.url}/v1/completions", json=body, headers=headers, timeout=120) as reply:
            assert reply.status_code == 200
            events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]
        text = "".join(c["text"] for e in events for c in e["choices"])
        usage = events[-1]["usage"]
    else:
        reply = httpx.post(f"{decode.url}/v1/completions", json=body, headers=headers, timeout=120)
        assert reply.status_code == 200, reply.text
        text, usage = reply.json()["choices"][0]["text"], reply.json()["usage"]
    assert text
    assert usage["completion_tokens"] == 8
    # The decode server took every whole block of the prompt from the prefill's files.
    loaded = external_kv_tokens(decode) - decode_external_before
    assert loaded == (prompt_tokens - 1) // 128 * 128 > 0
    assert f"Inject KV cache of {int(loaded)} tokens to the paged memory" in decode.log()


def test_the_prefill_leg_must_not_carry_min_tokens(vllm_pair: tuple[VllmServer, VllmServer]) -> None:
    """Why vLLM's proxies drop min_tokens from the prefill copy instead of passing it on."""
    prefill = vllm_pair[0]
    body = {**prefill_copy({"model": prefill.model, "prompt": "x"}), "min_tokens": 4}
    reply = httpx.post(f"{prefill.url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 400
    assert reply.json()["error"]["message"].startswith("min_tokens must be less than or equal to max_tokens=1")


def test_the_auxiliary_endpoints_answer_on_cpu(vllm_pair: tuple[VllmServer, VllmServer]) -> None:
    """What later work may lean on, and what it may not (/v1/models/{id} is not served)."""
    server = vllm_pair[0]

    def post(path: str, body: dict[str, object]) -> dict[str, object]:
        reply = httpx.post(f"{server.url}{path}", json={"model": server.model, **body}, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.json()

    assert httpx.get(f"{server.url}/v1/models/{server.model}").status_code == 404
    assert httpx.get(f"{server.url}/load").json() == {"server_load": 0}
    tokens = post("/tokenize", {"prompt": "def f(x): return x"})
    assert tokens["count"] == len(tokens["tokens"]) > 1
    assert tokens["max_model_len"] == MAX_MODEL_LEN
    # With messages, /tokenize applies the chat template: its special tokens come on top of the text's.
    chat_tokens = post("/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert chat_tokens["count"] > post("/tokenize", {"prompt": "hi"})["count"] + 3
    assert post("/detokenize", {"tokens": tokens["tokens"]}) == {"prompt": "def f(x): return x"}
    response = post("/v1/responses", {"input": "Say hi", "max_output_tokens": 4})
    assert response["object"] == "response"
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["type"] == "message"
    assert response["output"][0]["content"][0]["type"] == "output_text"
    assert response["usage"]["output_tokens"] == 4
