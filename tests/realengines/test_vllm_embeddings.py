"""/v1/embeddings on real vLLM (CPU build), served from the tiny Sentence Transformers layout that
tests/realengines/make_model.py builds. It needs a server of its own, so it runs last (the fleet
stops one of the pair to stay within two servers)."""

from __future__ import annotations

import math
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.realengines.harness import VllmServer

pytestmark = [pytest.mark.real_engine, pytest.mark.e2e]


def test_the_embedding_model_answers_v1_embeddings(vllm_server: Callable[..., VllmServer]) -> None:
    server = vllm_server("embed")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
    done = client.embeddings.create(model=server.model, input=["hello world", "def f(x): pass"])
    assert [item.index for item in done.data] == [0, 1]
    assert {len(item.embedding) for item in done.data} == {128}
    # Mean pooling, then the Normalize module: unit vectors.
    assert all(math.isclose(math.fsum(x * x for x in item.embedding), 1.0, rel_tol=1e-3) for item in done.data)
    assert done.usage.prompt_tokens > 0
    # A pooling server has no generation routes at all.
    reply = httpx.post(f"{server.url}/v1/completions", json={"model": server.model, "prompt": "x"})
    assert reply.status_code == 404
