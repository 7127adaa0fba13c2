"""NanoDeploy/DLEngine PD through real processes: RouterPanel (uvicorn; the tests marked ``servers``
under daphne too) in front of simulated prefill and decode engines. Every test ends by checking
that each KV block a prefill allocated was freed exactly once and that RouterPanel holds no counter."""

from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest

from enginesim.testing import run_simulator
from tests.e2e.pd_support import (
    answer_text,
    chat,
    completion,
    events,
    expected_text,
    metric_values,
    post,
    streamed_text,
    wait_kv_settled,
    wait_router_idle,
)
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

MODEL = "nd-model"


@pytest.fixture(scope="module")
def engines():
    """Two NanoDeploy prefill and two decode engines serving ``nd-model``."""
    common = {"engine": "nanodeploy", "served_model_name": MODEL, "model_path": "/models/nd-model"}
    with (
        run_simulator(role="prefill", **common) as p1,
        run_simulator(role="prefill", **common) as p2,
        run_simulator(role="decode", itl_ms=1, **common) as d1,
        run_simulator(role="decode", itl_ms=1, **common) as d2,
    ):
        yield [p1, p2], [d1, d2]


@pytest.fixture
def pd(stack, engines):
    """The engines registered as prefill/decode nodes with ``serving_mode=pd`` and short timeouts;
    yields ``(stack, prefills, decodes)`` and checks afterwards that nothing leaked."""
    prefills, decodes = engines
    for sim in (*prefills, *decodes):
        sim.reset()
    for sim in prefills:
        stack.add_node(sim.url, [MODEL], role="prefill", engine_type="nanodeploy", settle=False)
    for sim in decodes:
        stack.add_node(sim.url, [MODEL], role="decode", engine_type="nanodeploy", settle=False)
    stack.set_policy(MODEL, serving_mode="pd", first_token_timeout=3.0, total_timeout=10.0, settle=False)
    stack.settle()
    yield stack, prefills, decodes
    for ledger in wait_kv_settled(prefills):
        assert ledger["freed"] == ledger["allocated"], ledger
        assert ledger["double_free"] == 0 and ledger["unknown_free"] == 0, ledger
    assert wait_router_idle(stack) == {"node_inflight": 0, "pd_inflight": 0, "pd_cleanups_pending": 0}


def allocated(prefills) -> int:
    return sum(sim.stats()["kv"]["allocated"] for sim in prefills)


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completions"])
def test_a_pd_request_answers_like_a_hybrid_engine_and_frees_the_kv(pd, make):
    stack, prefills, decodes = pd
    body = make(MODEL, max_tokens=12)
    response = post(stack, body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert answer_text(data) == expected_text(body)
    pair = response.headers["x-routerpanel-node"]
    assert pair.startswith("prefill=http://127.0.0.1:") and "; decode=http://127.0.0.1:" in pair
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    assert allocated(prefills) == 1
    # What each leg was sent: the prefill a non-streaming copy asking for remote decode, with the
    # client's budget unclamped; the decode the client's request plus the migration.
    prefill_sim = next(s for s in prefills if s.url in pair)
    decode_sim = next(s for s in decodes if s.url in pair)
    sent = [r for r in prefill_sim.requests() if r["path"].startswith("/v1/")][-1]["body"]
    assert sent["stream"] is False and sent["max_tokens"] == 12
    assert sent["kv_transfer_params"] == {"do_remote_decode": True}
    decoded = decode_sim.requests()[-1]["body"]
    assert set(decoded["kv_transfer_params"]) == {"migration", "seq_id", "first_token"}
    # The release goes out just after the answer (gathered with any others for that node: docs/pd.md).
    frees = wait_until(
        lambda: [r["body"] for r in prefill_sim.requests() if r["path"] == "/pd/free"], 5, "no /pd/free was sent"
    )
    assert frees == [{"seq_ids": [decoded["kv_transfer_params"]["seq_id"]]}]


@pytest.mark.servers("uvicorn", "daphne")
@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completions"])
def test_a_streamed_pd_request_relays_the_decode_stream(pd, make):
    stack, prefills, _ = pd
    body = make(MODEL, max_tokens=16, stream=True, stream_options={"include_usage": True})
    response = post(stack, body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    parsed = events(response.text)
    assert parsed[-1] == "[DONE]"
    assert streamed_text(parsed) == expected_text(body)
    usage = [e["usage"] for e in parsed if isinstance(e, dict) and e.get("usage")]
    assert usage and usage[-1]["total_tokens"] == usage[-1]["prompt_tokens"] + usage[-1]["completion_tokens"]
    wait_kv_settled(prefills)


def test_the_official_openai_client_works_through_pd(pd):
    stack, _, _ = pd
    client = openai.OpenAI(base_url=stack.v1, api_key=stack.key, max_retries=0)
    messages = [{"role": "user", "content": "hello over PD"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    assert answer.choices[0].message.content == expected_text(chat(MODEL, "hello over PD", max_tokens=10))
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer.choices[0].message.content


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completions"])
def test_eos_at_prefill_is_answered_by_the_prefill_as_json_or_one_chunk(pd, make):
    stack, prefills, decodes = pd
    body = make(MODEL, "stop right away [[eos]]")
    response = post(stack, body)
    assert response.status_code == 200, response.text
    assert answer_text(response.json()) == expected_text(body)
    streamed = post(stack, {**body, "stream": True})
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    parsed = events(streamed.text)
    assert len(parsed) == 2 and parsed[1] == "[DONE]"
    chunk = parsed[0]
    assert chunk["object"] == ("chat.completion.chunk" if make is chat else "text_completion")
    if make is chat:
        assert chunk["choices"][0]["delta"]["role"] == "assistant"
    assert streamed_text(parsed) == expected_text(body)
    assert sum(s.stats()["pd"]["eos_at_prefill"] for s in prefills) == 2
    assert sum(s.stats()["pd"]["migrations_in"] for s in decodes) == 0
    assert allocated(prefills) == 0


def test_round_robin_spreads_pd_requests_over_every_prefill_and_every_decode_node(stack, engines):
    """DLRouter's counter was shared by both roles: with two prefills and two decodes every request
    went to the same pair. Separate counters per role use all four nodes."""
    prefills, decodes = engines
    for sim in (*prefills, *decodes):
        sim.reset()
    with run_simulator(engine="nanodeploy", role="decode", served_model_name=MODEL) as third:
        for sim in prefills:
            stack.add_node(sim.url, [MODEL], role="prefill", engine_type="nanodeploy", settle=False)
        for sim in (*decodes, third):
            stack.add_node(sim.url, [MODEL], role="decode", engine_type="nanodeploy", settle=False)
        stack.set_policy(MODEL, serving_mode="pd", strategy="round_robin", settle=False)
        stack.settle()
        pairs = set()
        for i in range(12):
            response = post(stack, chat(MODEL, f"question {i}", max_tokens=4))
            assert response.status_code == 200, response.text
            pairs.add(response.headers["x-routerpanel-node"])
        prefill_counts = [s.stats()["pd"]["migrations_out"] for s in prefills]
        decode_counts = [s.stats()["pd"]["migrations_in"] for s in (*decodes, third)]
        assert prefill_counts == [6, 6]
        assert decode_counts == [4, 4, 4]
        assert len(pairs) == 6  # every prefill met every decode
        wait_kv_settled(prefills)
        wait_router_idle(stack)


def test_a_missing_role_is_a_503_that_names_it(stack, engines):
    prefills, decodes = engines
    prefill_node = stack.add_node(prefills[0].url, [MODEL], role="prefill", engine_type="nanodeploy")
    response = post(stack, chat(MODEL, max_tokens=4))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_decode_node"
    assert "decode" in response.json()["error"]["message"]
    stack.api.delete(f"/api/nodes/{prefill_node['id']}/")
    stack.add_node(decodes[0].url, [MODEL], role="decode", engine_type="nanodeploy")
    response = post(stack, chat(MODEL, max_tokens=4))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_prefill_node"
    assert "prefill" in response.json()["error"]["message"]


def test_serving_mode_picks_pd_or_hybrid_nodes(stack, engines):
    prefills, decodes = engines
    for sim in (*prefills, *decodes):
        sim.reset()
    with run_simulator(engine="nanodeploy", role="hybrid", served_model_name=MODEL) as hybrid:
        stack.add_node(hybrid.url, [MODEL], role="hybrid", engine_type="nanodeploy", settle=False)
        stack.add_node(prefills[0].url, [MODEL], role="prefill", engine_type="nanodeploy", settle=False)
        stack.add_node(decodes[0].url, [MODEL], role="decode", engine_type="nanodeploy", settle=False)
        stack.settle()
        # auto: prefill and decode nodes exist, so PD
        response = post(stack, chat(MODEL, max_tokens=4))
        assert response.headers["x-routerpanel-node"].startswith("prefill=")
        stack.set_policy(MODEL, serving_mode="hybrid")
        response = post(stack, chat(MODEL, max_tokens=4))
        assert response.status_code == 200
        assert response.headers["x-routerpanel-node"] == hybrid.url
        stack.set_policy(MODEL, serving_mode="pd")
        response = post(stack, chat(MODEL, max_tokens=4))
        assert response.headers["x-routerpanel-node"] == f"prefill={prefills[0].url}; decode={decodes[0].url}"
        wait_kv_settled(prefills)


# -- Failure paths ---------------------------------------------------------------------------------


def one_pair(stack, engines):
    prefills, decodes = engines
    stack.add_node(prefills[0].url, [MODEL], role="prefill", engine_type="nanodeploy", settle=False)
    stack.add_node(decodes[0].url, [MODEL], role="decode", engine_type="nanodeploy", settle=False)
    for sim in (*prefills, *decodes):
        sim.reset()  # after the registrations: their health probes are not the tests' requests
    stack.set_policy(MODEL, serving_mode="pd", retry_budget=0, first_token_timeout=1.5, total_timeout=4.0, settle=False)
    stack.settle()
    return prefills[0], decodes[0]


@pytest.fixture
def pair(stack, engines):
    """One prefill and one decode node, no retries, short timeouts; checks for leaks afterwards."""
    prefill, decode = one_pair(stack, engines)
    yield stack, prefill, decode
    ledger = wait_kv_settled([prefill])[0]
    assert ledger["freed"] == ledger["allocated"] and ledger["double_free"] == 0 and ledger["unknown_free"] == 0
    assert wait_router_idle(stack) == {"node_inflight": 0, "pd_inflight": 0, "pd_cleanups_pending": 0}
    assert decode.wait_for(lambda s: s["requests"]["in_flight"] == 0)


def test_a_prefill_error_keeps_its_status_and_message(pair):
    stack, prefill, decode = pair
    prefill.set_faults(error_rate=1.0, error_status=500, count=1)
    response = post(stack, chat(MODEL, max_tokens=4))
    assert response.status_code == 500
    assert "injected fault" in response.json()["error"]["message"]
    assert decode.stats()["requests"]["total"] == 0  # never a silent recompute on the decode
    assert prefill.stats()["kv"]["allocated"] == 0


def test_a_decode_error_is_a_502_and_the_kv_is_freed(pair):
    stack, prefill, decode = pair
    decode.set_faults(error_rate=1.0, error_status=500, count=1)
    response = post(stack, chat(MODEL, max_tokens=4))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "decode_failed"
    assert prefill.stats()["kv"]["allocated"] == 1
    assert wait_kv_settled([prefill])[0]["freed"] == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_hanging_decode_times_out_with_504_and_the_kv_is_freed(pair, stream):
    stack, prefill, decode = pair
    decode.set_faults(hang=True, count=1)
    response = post(stack, chat(MODEL, max_tokens=4, stream=stream))
    assert response.status_code == 504
    assert wait_kv_settled([prefill])[0]["freed"] == 1
    decode.wait_for(lambda s: s["requests"]["cancelled"] == 1)


def test_a_hanging_prefill_times_out_with_504(pair):
    stack, prefill, decode = pair
    prefill.set_faults(hang=True, count=1)
    response = post(stack, chat(MODEL, max_tokens=4))
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "prefill_timeout"
    assert decode.stats()["requests"]["total"] == 0


def test_a_decode_stream_that_breaks_ends_with_an_error_event_and_the_kv_is_freed(pair):
    stack, prefill, decode = pair
    decode.set_faults(close_after_chunks=2, count=1)
    response = post(stack, chat(MODEL, max_tokens=16, stream=True))
    assert response.status_code == 200
    parsed = events(response.text)
    assert parsed[-1] == "[DONE]"
    assert parsed[-2]["error"]["code"] == "decode_stream_error"
    assert wait_kv_settled([prefill])[0]["freed"] == 1


def raw_request(stack, body: bytes, path: str = "/v1/chat/completions") -> socket.socket:
    host, port = stack.base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {stack.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_a_client_that_leaves_during_the_prefill_still_gets_its_kv_freed(pair):
    """The prefill engine has allocated the KV and will answer a seq_id nobody asked for any more:
    RouterPanel lets the call finish and frees it (docs/pd.md, "Nothing leaks")."""
    stack, prefill, decode = pair
    prefill.set_faults(slow_first_token_ms=600, count=1)
    sock = raw_request(stack, json.dumps(chat(MODEL, max_tokens=4)).encode())
    prefill.wait_for(lambda s: s["kv"]["allocated"] == 1)
    sock.close()  # the client is gone while the prefill computes
    ledger = prefill.wait_for(lambda s: s["kv"]["freed"] == 1)["kv"]
    assert ledger["double_free"] == 0
    assert prefill.stats()["requests"]["cancelled"] == 0  # the prefill call was not abandoned
    assert decode.stats()["requests"]["total"] == 0  # nobody to decode for


@pytest.mark.servers("uvicorn", "daphne")
def test_a_client_that_leaves_mid_stream_cancels_the_decode_and_frees_the_kv(stack, engines):
    with run_simulator(engine="nanodeploy", role="decode", served_model_name=MODEL, itl_ms=50) as slow:
        prefill, _ = one_pair(stack, engines)
        nodes = stack.api.get("/api/nodes/", params={"limit": 1000}).json()["results"]
        for node in nodes:
            if node["role"] == "decode":
                stack.api.delete(f"/api/nodes/{node['id']}/")
        stack.add_node(slow.url, [MODEL], role="decode", engine_type="nanodeploy")
        body = chat(MODEL, "a long answer please [[len=200]]", max_tokens=200, stream=True)
        with httpx.stream(
            "POST",
            stack.v1 + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {stack.key}"},
            timeout=30,
        ) as response:
            assert response.status_code == 200
            for _ in response.iter_raw():
                break  # leave after the first bytes
        slow.wait_for(lambda s: s["requests"]["cancelled"] == 1)
        ledger = prefill.wait_for(lambda s: s["kv"]["freed"] == 1)["kv"]
        assert ledger["double_free"] == 0 and ledger["outstanding_count"] == 0
        wait_router_idle(stack)


def test_leg_metrics_are_exported(pd):
    stack, _, _ = pd
    assert post(stack, chat(MODEL, max_tokens=4)).status_code == 200
    wait_until(lambda: metric_values(stack, "routerpanel_proxy_pd_frees_total"), 5, "no PD free was counted")
    durations = metric_values(stack, "routerpanel_proxy_pd_leg_duration_seconds_count")
    assert any('leg="prefill"' in k for k in durations) and any('leg="decode"' in k for k in durations)
    frees = metric_values(stack, "routerpanel_proxy_pd_frees_total")
    assert frees.get('{result="ok"}', 0) >= 1
    # DLEngine echoes the ids a /pd/free names (the release is queued): "held or not" is not reported.
    assert set(frees) <= {'{result="ok"}', '{result="failed"}'}
