"""The vLLM simulator's endpoints beyond chat and completions: a generation server serves
``/v1/responses``, a pooling server embeddings, score and rerank (and no chat), both the tokenizer
endpoints; each refuses what vLLM's request models refuse (enginesim/flavours/vllm_surface.py)."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator

import httpx
import pytest

from enginesim.testing import Simulator, run_simulator


@pytest.fixture(scope="module")
def generate() -> Iterator[Simulator]:
    """A vLLM simulator serving a generation model, ``sim-model``."""
    with run_simulator(engine="vllm") as sim:
        yield sim


@pytest.fixture(scope="module")
def pooling() -> Iterator[Simulator]:
    """A vLLM simulator serving a pooling model (``--runner pooling``)."""
    with run_simulator(engine="vllm", extra_args=["--runner", "pooling"]) as sim:
        yield sim


def post(sim: Simulator, path: str, body: object) -> httpx.Response:
    return httpx.post(sim.url + path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def test_tokenize_and_detokenize_answer_with_vllms_fields(generate: Simulator) -> None:
    tokens = post(generate, "/tokenize", {"model": "sim-model", "prompt": "one two three"})
    assert tokens.status_code == 200
    assert set(tokens.json()) == {"count", "max_model_len", "tokens", "token_strs"}
    assert tokens.json()["count"] == 3 and tokens.json()["token_strs"] is None
    chat = post(generate, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["count"] >= 1
    text = post(generate, "/detokenize", {"model": "sim-model", "tokens": [0, 1, 2]})
    assert text.status_code == 200 and text.json() == {"prompt": "alpha bravo charlie"}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/detokenize", {"model": "sim-model"}, "body.tokens"),
        ("/detokenize", {"tokens": [1, -1]}, "body.tokens.1"),
        ("/detokenize", {"tokens": ["a"]}, "body.tokens.0"),
        ("/v1/responses", {"model": "sim-model"}, "body.input"),
    ],
)
def test_what_the_request_models_refuse_is_vllms_schema_400(
    generate: Simulator, path: str, body: dict[str, object], param: str
) -> None:
    answer = post(generate, path, body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("Bad Request", param, 400)
    assert error["message"].startswith("1 validation error:")


@pytest.mark.parametrize("body", [{"model": "sim-model"}, {"prompt": 5}])
def test_a_tokenize_body_of_neither_form_fails_both_as_vllms_union_does(generate: Simulator, body: dict) -> None:
    error = post(generate, "/tokenize", body).json()["error"]
    assert (error["type"], error["param"]) == ("Bad Request", "body.prompt")
    assert error["message"].startswith("2 validation errors:\n  {")
    assert "'loc': 'body.messages'" in error["message"].splitlines()[2]


def test_detokenize_reads_numeric_strings_as_pydantic_does(generate: Simulator) -> None:
    assert post(generate, "/detokenize", {"tokens": ["1", 2]}).json() == {"prompt": "bravo charlie"}


def test_an_unknown_model_is_vllms_404(generate: Simulator) -> None:
    answer = post(generate, "/tokenize", {"model": "other", "prompt": "x"})
    assert answer.status_code == 404
    assert answer.json()["error"]["type"] == "NotFoundError"


def test_responses_answers_a_response_object_cut_by_max_output_tokens(generate: Simulator) -> None:
    answer = post(generate, "/v1/responses", {"model": "sim-model", "input": "hello", "max_output_tokens": 2})
    assert answer.status_code == 200
    body = answer.json()
    assert (body["object"], body["status"], body["incomplete_details"]) == (
        "response",
        "incomplete",
        {"reason": "max_output_tokens"},
    )
    assert body["output"][0]["content"][0]["type"] == "output_text"
    assert body["usage"]["output_tokens"] == 2


def test_a_streamed_response_is_server_sent_events_ending_with_completed(generate: Simulator) -> None:
    with httpx.stream("POST", generate.url + "/v1/responses", json={"input": "hello", "stream": True}) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("event: ") for line in answer.iter_lines() if line.startswith("event: ")]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert "response.output_text.delta" in events


def test_a_generation_server_serves_no_embeddings(generate: Simulator) -> None:
    answer = post(generate, "/v1/embeddings", {"input": "x"})
    assert (answer.status_code, answer.json()) == (404, {"detail": "Not Found"})


def test_a_pooling_server_serves_embeddings_as_floats_or_base64(pooling: Simulator) -> None:
    floats = post(pooling, "/v1/embeddings", {"model": "sim-model", "input": ["a b", "c"]})
    assert floats.status_code == 200
    body = floats.json()
    assert body["id"].startswith("embd-") and body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1]
    vector = body["data"][0]["embedding"]
    assert len(vector) == 128 and abs(sum(v * v for v in vector) - 1.0) < 1e-6
    assert body["usage"] == {
        "prompt_tokens": 3,
        "total_tokens": 3,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }
    packed = post(pooling, "/v1/embeddings", {"input": "a b", "encoding_format": "base64"}).json()
    decoded = struct.unpack("<128f", base64.b64decode(packed["data"][0]["embedding"]))
    assert decoded == pytest.approx(vector, abs=1e-6)


def test_a_pooling_server_scores_and_reranks(pooling: Simulator) -> None:
    score = post(pooling, "/v1/score", {"text_1": "q", "text_2": ["a", "b"]})
    assert score.status_code == 200
    assert [d["object"] for d in score.json()["data"]] == ["score", "score"]
    rerank = post(pooling, "/v1/rerank", {"query": "q", "documents": ["a", "b", "c"], "top_n": 2})
    assert rerank.status_code == 200
    results = rerank.json()["results"]
    assert len(results) == 2 and results[0]["relevance_score"] >= results[1]["relevance_score"]
    missing = post(pooling, "/v1/rerank", {"query": "q"})
    assert (missing.status_code, missing.json()["error"]["param"]) == (400, "body.documents")


def test_a_pooling_server_serves_no_chat_or_completions(pooling: Simulator) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        answer = post(pooling, path, {"model": "sim-model", "prompt": "x"})
        assert (answer.status_code, answer.json()) == (404, {"detail": "Not Found"})
