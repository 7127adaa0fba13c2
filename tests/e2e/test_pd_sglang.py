"""SGLang PD by bootstrap dual dispatch through real processes: the same request, with the prefill's
bootstrap host, port and a random room, goes to both legs at once; the decode answers; a failed
decode cancels the prefill."""

from __future__ import annotations

import httpx
import pytest

from enginesim.testing import free_port, run_simulator
from tests.e2e.pd_support import (
    answer_text,
    chat,
    completion,
    events,
    expected_text,
    post,
    streamed_text,
    wait_router_idle,
)

pytestmark = pytest.mark.e2e

MODEL = "sglang-model"


@pytest.fixture(scope="module")
def engines():
    bootstrap = free_port()
    common = {"engine": "sglang", "served_model_name": MODEL, "model_path": "/models/sglang-model"}
    with (
        run_simulator(role="prefill", extra_args=[f"--bootstrap-port={bootstrap}", "--pd-timeout-s=3"], **common) as p,
        run_simulator(role="decode", extra_args=["--pd-timeout-s=3"], **common) as d,
    ):
        p.bootstrap_port = bootstrap
        yield p, d


@pytest.fixture
def pd(stack, engines):
    prefill, decode = engines
    stack.add_node(
        prefill.url, [MODEL], role="prefill", engine_type="sglang", bootstrap_port=prefill.bootstrap_port, settle=False
    )
    stack.add_node(decode.url, [MODEL], role="decode", engine_type="sglang", settle=False)
    prefill.reset()  # after the registrations: their health probes are not the tests' requests
    decode.reset()
    stack.set_policy(
        MODEL, serving_mode="pd", retry_budget=0, first_token_timeout=8.0, total_timeout=15.0, settle=False
    )
    stack.settle()
    yield stack, prefill, decode
    assert wait_router_idle(stack) == {"node_inflight": 0, "pd_inflight": 0, "pd_cleanups_pending": 0}
    prefill.wait_for(lambda s: s["requests"]["in_flight"] == 0)
    decode.wait_for(lambda s: s["requests"]["in_flight"] == 0)


def inference(sim) -> list[dict]:
    return [r for r in sim.requests() if r["path"].startswith("/v1/")]


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_sglang_pd_sends_both_legs_to_the_same_bootstrap_room(pd, make, stream):
    stack, prefill, decode = pd
    body = make(MODEL, max_tokens=10, **({"stream": True} if stream else {}))
    response = post(stack, body)
    assert response.status_code == 200, response.text
    text = streamed_text(events(response.text)) if stream else answer_text(response.json())
    assert text == expected_text(body)
    to_prefill, to_decode = inference(prefill)[-1]["body"], inference(decode)[-1]["body"]
    assert to_prefill["bootstrap_host"] == to_decode["bootstrap_host"] == "127.0.0.1"
    assert to_prefill["bootstrap_port"] == to_decode["bootstrap_port"] == prefill.bootstrap_port
    room = to_prefill["bootstrap_room"]
    assert room == to_decode["bootstrap_room"] and isinstance(room, int) and 0 <= room < 2**63
    assert prefill.stats()["pd"]["rooms_ok"] == 1 and decode.stats()["pd"]["rooms_ok"] == 1
    assert response.headers["x-routerpanel-node"] == f"prefill={prefill.url}; decode={decode.url}"


def test_a_batch_and_n_get_one_room_each(pd):
    stack, prefill, decode = pd
    body = completion(MODEL, max_tokens=4)
    body["prompt"] = ["first prompt", "second prompt"]
    body["n"] = 2
    response = post(stack, body)
    assert response.status_code == 200, response.text
    rooms = inference(decode)[-1]["body"]["bootstrap_room"]
    assert len(rooms) == 4 and len(set(rooms)) == 4
    assert inference(prefill)[-1]["body"]["bootstrap_room"] == rooms


def test_a_failed_decode_is_a_502_and_cancels_the_prefill(pd):
    stack, prefill, decode = pd
    decode.set_faults(error_rate=1.0, error_status=500, count=1)
    response = post(stack, chat(MODEL, max_tokens=4))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "decode_failed"
    prefill.wait_for(lambda s: s["requests"]["cancelled"] == 1)


def test_a_failed_prefill_explains_the_failure(pd):
    stack, prefill, decode = pd
    prefill.set_faults(error_rate=1.0, error_status=503, count=1)
    response = post(stack, chat(MODEL, max_tokens=4))
    assert response.status_code == 503  # the prefill's own answer, not the decode's "bootstrap failed"
    assert "injected fault" in response.json()["error"]["message"]
    decode.wait_for(lambda s: s["requests"]["in_flight"] == 0)


def test_a_client_that_leaves_cancels_both_legs(pd):
    stack, prefill, decode = pd
    decode.set_faults(hang=True, count=1)  # the decode never joins the room; the prefill waits for it
    with pytest.raises(httpx.ReadTimeout):  # the client gives up well before the 3 s room timeout
        post(stack, chat(MODEL, max_tokens=4), timeout=httpx.Timeout(1.0, connect=5.0))
    prefill.wait_for(lambda s: s["requests"]["cancelled"] == 1)
    decode.wait_for(lambda s: s["requests"]["cancelled"] == 1)


def rooms_sent(sim) -> list:
    return [r["body"]["bootstrap_room"] for r in inference(sim)]


def test_a_pair_that_failed_with_a_retryable_status_is_retried_with_a_fresh_room(pd):
    """As SGLang's gateway does: a new pair and a new room, within the route's retry budget, while
    nothing reached the client; the failed pair's legs were both ended first."""
    stack, prefill, decode = pd
    stack.set_policy(MODEL, serving_mode="pd", retry_budget=2, first_token_timeout=8.0, total_timeout=15.0)
    decode.set_faults(error_rate=1.0, error_status=503, count=1)
    body = chat(MODEL, max_tokens=6)
    response = post(stack, body)
    assert response.status_code == 200, response.text
    assert answer_text(response.json()) == expected_text(body)
    first, second = rooms_sent(decode)
    assert first != second and rooms_sent(prefill) == [first, second]
    prefill.wait_for(lambda s: s["requests"]["cancelled"] == 1)  # the first pair's prefill was called off
    assert prefill.stats()["pd"]["rooms_ok"] == 1 and decode.stats()["pd"]["rooms_ok"] == 1

    prefill.reset()
    decode.reset()
    prefill.set_faults(error_rate=1.0, error_status=500, count=1)
    response = post(stack, chat(MODEL, max_tokens=6, stream=True))
    assert response.status_code == 200 and streamed_text(events(response.text)) == expected_text(body)
    assert len(set(rooms_sent(prefill))) == 2


def test_a_pair_that_keeps_failing_answers_once_the_retry_budget_is_spent(pd):
    stack, prefill, decode = pd
    stack.set_policy(MODEL, serving_mode="pd", retry_budget=2, first_token_timeout=8.0, total_timeout=15.0)
    decode.set_faults(error_rate=1.0, error_status=503, count=3)
    response = post(stack, chat(MODEL, max_tokens=4))
    assert response.status_code == 502 and response.json()["error"]["code"] == "decode_failed"
    assert len(set(rooms_sent(decode))) == 3
    # Every prefill that reached its engine was called off (a decode that fails at once may beat its
    # prefill to the engine, which then never sees that one).
    stats = prefill.wait_for(lambda s: s["requests"]["in_flight"] == 0)
    assert 1 <= stats["requests"]["total"] == stats["requests"]["cancelled"] <= 3
