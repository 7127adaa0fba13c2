"""The rest of the OpenAI surface through the proxy (proxy/surface.py): embeddings, responses,
rerank, score, tokenize and detokenize go by the body's model to a node that serves the endpoint,
through the same key checks and attempt loop as chat; a model none of whose nodes serves the
endpoint is a 404 in OpenAI's shape; ``GET /v1/models/{id}`` answers from RouterPanel's list.
The engines are vLLM simulators, one generation and one pooling server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from enginesim.testing import Simulator, run_simulator
from proxy import snapshot as snapshots
from proxy.app import ProxyApp

from .conftest import API_KEY, AUTH, call, make_snapshot

POOLING = frozenset({"embeddings", "score", "rerank", "tokenize", "detokenize"})


@pytest.fixture(scope="module")
def sims() -> Iterator[tuple[Simulator, Simulator]]:
    """A vLLM generation simulator serving ``chat-m`` and a pooling one serving ``embed-m``."""
    with (
        run_simulator(engine="vllm", served_model_name="chat-m") as chat,
        run_simulator(engine="vllm", served_model_name="embed-m", extra_args=["--runner", "pooling"]) as embed,
    ):
        yield chat, embed


@pytest.fixture
def fleet(sims: tuple[Simulator, Simulator], proxy_app: ProxyApp) -> ProxyApp:
    """The two simulators as vLLM nodes (the pooling one says what it serves), a second key that
    may only use ``chat-m``, and the alias ``vectors`` for ``embed-m``."""
    chat, embed = sims
    snapshots.install(
        make_snapshot(
            [
                {"url": chat.url, "models": ["chat-m"], "engine_type": "vllm"},
                {"url": embed.url, "models": ["embed-m"], "engine_type": "vllm", "endpoints": POOLING},
            ],
            global_aliases=(("vectors", "embed-m"),),
            keys={API_KEY: {}, "rp-chat-only": {"allowed_models": ["chat-m"]}},
        )
    )
    return proxy_app


@pytest.fixture
async def client(fleet: ProxyApp) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client, talking to the proxy app in process."""
    transport = httpx.ASGITransport(app=fleet)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport) as http:
        yield openai.AsyncOpenAI(api_key=API_KEY, base_url="http://proxy/v1", http_client=http, max_retries=0)


async def test_embeddings_go_to_the_node_that_serves_them_through_an_alias(
    client: openai.AsyncOpenAI, sims: tuple[Simulator, Simulator]
) -> None:
    answer = await client.embeddings.with_raw_response.create(model="vectors", input=["a b", "c"])
    result = answer.parse()
    assert answer.headers["x-routerpanel-node"] == sims[1].url
    assert len(result.data) == 2 and len(result.data[0].embedding) == 128
    assert result.usage.prompt_tokens == 3
    assert sims[1].requests(1)[0]["body"]["model"] == "embed-m"  # type: ignore[index]


async def test_responses_and_the_model_object_through_the_official_client(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(model="chat-m", input="hello", max_output_tokens=3)
    assert response.status == "incomplete" and response.output_text
    model = await client.models.retrieve("chat-m")
    assert (model.id, model.object, model.owned_by) == ("chat-m", "model", "routerpanel")
    with pytest.raises(openai.NotFoundError) as raised:
        await client.models.retrieve("nope")
    assert raised.value.body["code"] == "model_not_found"  # type: ignore[index]


async def test_a_model_whose_nodes_do_not_serve_the_endpoint_is_a_404_in_openais_shape(fleet: ProxyApp) -> None:
    for path, body in (
        ("/v1/embeddings", {"model": "chat-m", "input": "x"}),
        ("/v1/responses", {"model": "embed-m", "input": "x"}),
        ("/v1/rerank", {"model": "chat-m", "query": "q", "documents": ["a"]}),
    ):
        answer = await call(fleet, "POST", path, json_body=body, headers=AUTH)
        assert answer.status == 404, path
        error = answer.json()["error"]
        assert (error["type"], error["code"]) == ("not_found_error", "endpoint_not_served")
        assert path in error["message"]


async def test_a_streamed_response_is_relayed_as_server_sent_events(fleet: ProxyApp) -> None:
    body = {"model": "chat-m", "input": "hello", "stream": True}
    answer = await call(fleet, "POST", "/v1/responses", json_body=body, headers=AUTH)
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/event-stream")
    assert answer.body.startswith(b"event: response.created\n")
    assert b"event: response.completed\n" in answer.body


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/tokenize", {"model": "chat-m", "prompt": "one two"}, 200),
        ("/detokenize", {"model": "embed-m", "tokens": [0, 1]}, 200),
        ("/v1/score", {"model": "embed-m", "text_1": "q", "text_2": ["a", "b"]}, 200),
        ("/v1/rerank", {"model": "embed-m", "query": "q", "documents": ["a", "b"]}, 200),
        ("/detokenize", {"model": "chat-m", "tokens": [-1]}, 400),  # the engine's answer, passed through
    ],
)
async def test_the_engines_answer_passes_through_with_its_status(
    fleet: ProxyApp, sims: tuple[Simulator, Simulator], path: str, body: dict[str, Any], status: int
) -> None:
    direct = httpx.post(sims[0 if body["model"] == "chat-m" else 1].url + path, json=body)
    answer = await call(fleet, "POST", path, json_body=body, headers=AUTH)
    assert answer.status == direct.status_code == status
    volatile = {"id", "created"}
    assert {k: v for k, v in answer.json().items() if k not in volatile} == {
        k: v for k, v in direct.json().items() if k not in volatile
    }


async def test_the_key_rules_hold_as_for_chat(fleet: ProxyApp) -> None:
    body = {"model": "embed-m", "input": "x"}
    assert (await call(fleet, "POST", "/v1/embeddings", json_body=body)).status == 401
    chat_only = {"Authorization": "Bearer rp-chat-only"}
    assert (await call(fleet, "POST", "/v1/embeddings", json_body=body, headers=chat_only)).status == 403
    unknown = await call(fleet, "POST", "/tokenize", json_body={"model": "nope", "prompt": "x"}, headers=AUTH)
    assert (unknown.status, unknown.json()["error"]["code"]) == (404, "model_not_found")
    assert (await call(fleet, "GET", "/v1/embeddings", headers=AUTH)).status == 405
    other_key = await call(fleet, "GET", "/v1/models/embed-m", headers=chat_only)
    assert other_key.status == 404  # not listed to this key, as in GET /v1/models


async def test_a_node_that_cannot_be_reached_is_retried_on_another_one(
    proxy_app: ProxyApp, sims: tuple[Simulator, Simulator]
) -> None:
    from enginesim.testing import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    snapshots.install(
        make_snapshot(
            [
                {"url": dead, "models": ["embed-m"], "engine_type": "vllm", "endpoints": POOLING},
                {"url": sims[1].url, "models": ["embed-m"], "engine_type": "vllm", "endpoints": POOLING},
            ]
        )
    )
    for _ in range(2):  # round robin tries the dead node first once
        answer = await call(
            proxy_app, "POST", "/v1/embeddings", json_body={"model": "embed-m", "input": "x"}, headers=AUTH
        )
        assert answer.status == 200 and answer.headers["x-routerpanel-node"] == sims[1].url


async def test_the_explanation_sees_only_the_nodes_that_serve_the_endpoint(fleet: ProxyApp) -> None:
    explain = {**AUTH, "x-routerpanel-explain": "1"}
    body = {"model": "vectors", "input": "x"}
    answer = await call(fleet, "POST", "/v1/embeddings", json_body=body, headers=explain)
    assert answer.status == 200
    assert "candidates=1;" in answer.headers["x-routerpanel-explain"]
    refused = await call(fleet, "POST", "/v1/embeddings", json_body={"model": "chat-m", "input": "x"}, headers=explain)
    assert refused.status == 404 and "pick=none" in refused.headers["x-routerpanel-explain"]
