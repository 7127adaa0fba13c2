"""Conformance of the plain OpenAI engine through real sockets: endpoints, shapes, aliases, errors, streams."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from enginesim import chat_prompt_text, expected_completion
from enginesim.testing import Simulator, run_simulator

MODEL_PATH = "/models/org/Llama-Sim-8B/"


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    """One hybrid OpenAI simulator for the module (reset before each test)."""
    with run_simulator(
        engine="openai", served_model_name="llama-sim", model_path=MODEL_PATH, extra_args=["--record-requests=5"]
    ) as sim:
        yield sim


@pytest.fixture(autouse=True)
def _reset(sim: Simulator) -> None:
    sim.reset()


def chat(sim: Simulator, content: str = "hello", **fields) -> httpx.Response:
    body = {"model": "llama-sim", "messages": [{"role": "user", "content": content}], **fields}
    return httpx.post(sim.url + "/v1/chat/completions", json=body, timeout=10)


def sse_events(response: httpx.Response) -> list[str]:
    events = [line[len("data: ") :] for line in response.text.split("\n\n") if line]
    assert all(not e.startswith("data:") for e in events)
    return events


def test_it_answers_health_with_ok(sim):
    response = httpx.get(sim.url + "/health")
    assert (response.status_code, response.text) == (200, "OK")


def test_it_lists_only_the_served_model(sim):
    body = httpx.get(sim.url + "/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["llama-sim"]


@pytest.mark.parametrize("name", ["llama-sim", "/models/org/Llama-Sim-8B", "Llama-Sim-8B"])
def test_it_accepts_the_served_name_the_model_path_and_its_basename_and_echoes_it(sim, name):
    response = chat(sim, model=name)
    assert response.status_code == 200
    assert response.json()["model"] == name


def test_it_rejects_an_unknown_model_with_model_not_found_listing_accepted_names(sim):
    response = chat(sim, model="gpt-4")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert error["type"]
    for name in ("llama-sim", "/models/org/Llama-Sim-8B", "Llama-Sim-8B"):
        assert name in error["message"]


def test_it_rejects_invalid_json_with_400(sim):
    response = httpx.post(sim.url + "/v1/chat/completions", content=b'{"model": ', timeout=10)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "code"}


def test_a_chat_answer_is_the_deterministic_completion_with_usage(sim):
    response = chat(sim, "[[len=12]] tell me a story", max_tokens=50)
    body = response.json()
    prompt = chat_prompt_text([{"role": "user", "content": "[[len=12]] tell me a story"}])
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected_completion(prompt, 50)}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 12, "total_tokens": 18}  # "user:" is a word


def test_max_tokens_and_max_completion_tokens_truncate_with_finish_reason_length(sim):
    for field in ("max_tokens", "max_completion_tokens"):
        body = chat(sim, "[[len=20]] go", **{field: 3}).json()
        assert len(body["choices"][0]["message"]["content"].split()) == 3
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3


def test_a_completion_answers_each_prompt_of_a_batch_n_times(sim):
    body = {"model": "llama-sim", "prompt": ["one", "two"], "n": 2, "max_tokens": 4}
    answer = httpx.post(sim.url + "/v1/completions", json=body, timeout=10).json()
    assert answer["object"] == "text_completion"
    texts = [(c["index"], c["text"]) for c in answer["choices"]]
    one, two = expected_completion("one", 4), expected_completion("two", 4)
    assert texts == [(0, one), (1, one), (2, two), (3, two)]


def test_a_chat_stream_sends_the_role_then_tokens_then_finish_then_done(sim):
    response = chat(sim, "[[len=4]] stream please", stream=True)
    assert response.headers["content-type"] == "text/event-stream"
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "llama-sim" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    prompt = chat_prompt_text([{"role": "user", "content": "[[len=4]] stream please"}])
    assert text == expected_completion(prompt)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)


def test_a_stream_ends_with_a_usage_chunk_only_when_include_usage_is_set(sim):
    body = {"model": "llama-sim", "prompt": "[[len=3]] x", "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(httpx.post(sim.url + "/v1/completions", json=body, timeout=10))
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-2]]
    assert "".join(texts) == expected_completion("[[len=3]] x")


def test_it_records_recent_requests_with_headers_and_json_body(sim):
    chat(sim, "remember me", user="u1", unknown_field={"kept": True})
    httpx.post(sim.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
               headers={"X-Trace": "abc"}, timeout=10)  # fmt: skip
    first, second = sim.requests()
    assert first["method"] == "POST" and first["path"] == "/v1/chat/completions"
    assert first["body"]["unknown_field"] == {"kept": True}
    assert first["body"]["messages"][0]["content"] == "remember me"
    assert second["headers"]["x-trace"] == "abc"


def test_the_request_log_is_bounded(sim):
    for i in range(8):
        chat(sim, f"n{i}", max_tokens=1)
    recorded = sim.requests()
    assert len(recorded) == 5
    assert recorded[-1]["body"]["messages"][0]["content"] == "n7"


def test_stats_count_requests_by_endpoint_and_status(sim):
    chat(sim)
    chat(sim, model="nope")
    httpx.get(sim.url + "/health")
    requests = sim.stats()["requests"]
    assert requests["total"] == 3
    assert requests["by_endpoint"] == {"/v1/chat/completions": 2, "/health": 1}
    assert requests["by_status"] == {"200": 2, "404": 1}
    assert requests["in_flight"] == 0


def test_fast_mode_serves_repeated_requests_from_cache_with_the_same_answer():
    with run_simulator(extra_args=["--fast"]) as fast:
        body = {"model": "sim-model", "prompt": "cached", "max_tokens": 5}
        answers = [httpx.post(fast.url + "/v1/completions", json=body, timeout=10).json() for _ in range(3)]
        assert all(a["choices"][0]["text"] == expected_completion("cached", 5) for a in answers)
        assert fast.stats()["requests"]["by_endpoint"]["/v1/completions"] == 3
        assert len(fast.requests()) == 3


def test_natural_tokens_sets_every_answers_length():
    with run_simulator(extra_args=["--natural-tokens=64"]) as long:
        body = {"model": "sim-model", "prompt": "how long", "max_tokens": 500}
        answer = httpx.post(long.url + "/v1/completions", json=body, timeout=10).json()
        assert answer["choices"][0]["text"] == expected_completion("how long", 500, natural_tokens=64)
        assert answer["usage"]["completion_tokens"] == 64


def test_a_client_expecting_100_continue_gets_its_answer_at_once(sim):
    headers = {"Expect": "100-continue", "Content-Type": "application/json"}
    body = json.dumps({"model": "llama-sim", "prompt": "x" * 4000, "max_tokens": 1}).encode()
    with socket.create_connection((sim.host, sim.port), timeout=5) as conn:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        conn.sendall(head.encode())
        assert conn.recv(100).startswith(b"HTTP/1.1 100 Continue")
        conn.sendall(body)
        assert conn.recv(100).startswith(b"HTTP/1.1 200 OK")


def test_the_request_log_can_be_limited_and_cleared(sim):
    for i in range(3):
        chat(sim, f"r{i}", max_tokens=1)
    assert [r["body"]["messages"][0]["content"] for r in sim.requests(limit=2)] == ["r1", "r2"]
    httpx.delete(sim.url + "/sim/requests")
    assert sim.requests() == []
