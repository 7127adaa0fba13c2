"""``/v1/embeddings`` through RouterPanel to a real vLLM pooling server (the tiny embedding model
of tests/realengines/make_model.py), with the official openai client; RouterPanel detects what the
node serves (``endpoints``), so a Responses request for that model is its own 404. Runs after
test_vllm_embeddings.py, on the same server."""

from __future__ import annotations

from collections.abc import Callable

import openai
import pytest

from tests.realengines.harness import VllmServer
from tests.support.stack import RouterPanelStack

pytestmark = [pytest.mark.real_engine, pytest.mark.e2e]


def test_embeddings_through_routerpanel_match_the_engines_own(
    routerpanel: RouterPanelStack, vllm_server: Callable[..., VllmServer]
) -> None:
    server = vllm_server("embed")
    # No engine type given: RouterPanel detects vLLM and, from the routes the server registered,
    # that it serves embeddings and no generation endpoint (nodes/engine_detect.py).
    node = routerpanel.add_node(server.url, [server.model], role="hybrid")
    assert node["engine_type"] == "vllm"
    assert "embeddings" in node["endpoints"] and "tokenize" in node["endpoints"]
    assert not {"chat", "completions", "responses"} & set(node["endpoints"])
    routed = openai.OpenAI(base_url=routerpanel.v1, api_key=routerpanel.key, timeout=120, max_retries=0)
    direct = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
    texts = ["hello world", "def f(x): pass"]
    raw = routed.embeddings.with_raw_response.create(model=server.model, input=texts)
    through = raw.parse()
    assert raw.headers["x-routerpanel-node"] == server.url
    own = direct.embeddings.create(model=server.model, input=texts)
    assert len(through.data) == len(own.data) == 2
    for mine, theirs in zip(through.data, own.data, strict=True):
        assert mine.embedding == pytest.approx(theirs.embedding, abs=1e-5)
    assert through.usage.prompt_tokens == own.usage.prompt_tokens
    with pytest.raises(openai.NotFoundError) as raised:
        routed.responses.create(model=server.model, input="x")
    assert raised.value.body["code"] == "endpoint_not_served"  # type: ignore[index]
