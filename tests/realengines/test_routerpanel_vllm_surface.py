"""The rest of the OpenAI surface through RouterPanel to real vLLM 0.32 (CPU build), with the
official openai client where it has a method: ``/v1/responses`` (plain and streamed),
``/tokenize`` and ``/detokenize``, and ``GET /v1/models/{id}``, which RouterPanel answers itself
(vLLM has no such path). One server of the session's pair, registered as a hybrid vLLM node with
no endpoints listed, so vLLM's default (a generation model's) applies. Runs before
test_routerpanel_vllm.py, whose last test kills a server of the pair."""

from __future__ import annotations

import httpx
import openai
import pytest

from nodes import engine_detect
from tests.realengines.harness import VllmServer
from tests.support.stack import RouterPanelStack

pytestmark = [pytest.mark.real_engine, pytest.mark.e2e]


@pytest.fixture
def node(
    routerpanel: RouterPanelStack, vllm_pair: tuple[VllmServer, VllmServer]
) -> tuple[RouterPanelStack, VllmServer]:
    server = vllm_pair[0]
    routerpanel.add_node(server.url, [server.model], role="hybrid", engine_type="vllm")
    return routerpanel, server


def test_responses_through_routerpanel_plain_and_streamed(node: tuple[RouterPanelStack, VllmServer]) -> None:
    stack, server = node
    client = openai.OpenAI(base_url=stack.v1, api_key=stack.key, timeout=120, max_retries=0)
    raw = client.responses.with_raw_response.create(model=server.model, input="Say hi", max_output_tokens=5)
    done = raw.parse()
    assert raw.headers["x-routerpanel-node"] == server.url
    assert done.object == "response" and done.status == "incomplete"
    assert done.incomplete_details is not None and done.incomplete_details.reason == "max_output_tokens"
    assert done.usage is not None and done.usage.output_tokens == 5
    events = [
        event.type
        for event in client.responses.create(model=server.model, input="Say hi", max_output_tokens=5, stream=True)
    ]
    assert events[0] == "response.created" and events[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in events


def test_tokenize_and_detokenize_through_routerpanel_answer_as_vllm_does(
    node: tuple[RouterPanelStack, VllmServer],
) -> None:
    stack, server = node
    headers = {"Authorization": f"Bearer {stack.key}"}
    body = {"model": server.model, "prompt": "def hello(world): return world"}
    direct = httpx.post(f"{server.url}/tokenize", json=body, timeout=60)
    routed = httpx.post(f"{stack.base}/tokenize", json=body, headers=headers, timeout=60)
    assert routed.status_code == direct.status_code == 200
    assert routed.json() == direct.json() and routed.json()["count"] == len(routed.json()["tokens"])
    tokens = {"model": server.model, "tokens": routed.json()["tokens"]}
    text = httpx.post(f"{stack.base}/detokenize", json=tokens, headers=headers, timeout=60)
    assert text.status_code == 200 and "hello" in text.json()["prompt"]
    # vLLM's own 400 (a negative token id fails its request model) comes through unchanged.
    bad = {"model": server.model, "tokens": [-1]}
    refused = httpx.post(f"{stack.base}/detokenize", json=bad, headers=headers, timeout=60)
    assert refused.status_code == 400
    assert refused.json() == httpx.post(f"{server.url}/detokenize", json=bad, timeout=60).json()


def test_the_model_object_comes_from_routerpanel(node: tuple[RouterPanelStack, VllmServer]) -> None:
    stack, server = node
    # What the server's routes show is vLLM's default for a generation model (nodes/engine_detect.py).
    assert engine_detect.detect(server.url, timeout=10).endpoints is None
    client = openai.OpenAI(base_url=stack.v1, api_key=stack.key, timeout=30, max_retries=0)
    model = client.models.retrieve(server.model)
    assert (model.id, model.object, model.owned_by) == (server.model, "model", "routerpanel")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    # A generation model's node does not serve embeddings: RouterPanel says so without asking it.
    with pytest.raises(openai.NotFoundError) as raised:
        client.embeddings.create(model=server.model, input="x")
    assert raised.value.body["code"] == "endpoint_not_served"  # type: ignore[index]
