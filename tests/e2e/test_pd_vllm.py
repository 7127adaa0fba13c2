"""vLLM two-stage PD through real processes and the strict vLLM simulator: one request id on both
legs, the prefill copy clamped to one token without min_tokens, the decode given the prefill's
``kv_transfer_params`` unchanged (NIXL) or none at all (the ExampleConnector answers ``null``), and
data-parallel decode ranks addressed as ``url@rank`` with ``X-data-parallel-rank``."""

from __future__ import annotations

import pytest

from enginesim.testing import run_simulator
from tests.e2e.pd_support import (
    answer_text,
    chat,
    completion,
    events,
    expected_text,
    post,
    streamed_text,
    wait_kv_settled,
    wait_router_idle,
)

pytestmark = pytest.mark.e2e

MODEL = "vllm-model"


@pytest.fixture(scope="module")
def engines():
    """A vLLM prefill and a decode with two data-parallel ranks."""
    common = {"engine": "vllm", "served_model_name": MODEL, "model_path": "/models/vllm-model"}
    with (
        run_simulator(role="prefill", **common) as prefill,
        run_simulator(role="decode", extra_args=["--dp-size=2"], **common) as decode,
    ):
        yield prefill, decode


@pytest.fixture
def pd(stack, engines):
    prefill, decode = engines
    prefill.reset()
    decode.reset()
    stack.add_node(prefill.url, [MODEL], role="prefill", engine_type="vllm", settle=False)
    stack.add_node(decode.url, [MODEL], role="decode", engine_type="vllm", dp_size=2, settle=False)
    stack.set_policy(
        MODEL, serving_mode="pd", retry_budget=0, first_token_timeout=3.0, total_timeout=10.0, settle=False
    )
    stack.settle()
    yield stack, prefill, decode
    assert wait_router_idle(stack) == {"node_inflight": 0, "pd_inflight": 0, "pd_cleanups_pending": 0}


def inference(sim) -> list[dict]:
    return [r for r in sim.requests() if r["path"].startswith("/v1/")]


PREFILL_KV = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_vllm_pd_shares_one_request_id_and_hands_over_the_kv_params(pd, make, stream):
    stack, prefill, decode = pd
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    body = make(MODEL, max_tokens=12, **extra)
    response = post(stack, body, headers={"X-Request-Id": "client-id-1"})
    assert response.status_code == 200, response.text
    text = streamed_text(events(response.text)) if stream else answer_text(response.json())
    assert text == expected_text(body)

    sent_prefill = inference(prefill)[-1]
    sent_decode = inference(decode)[-1]
    assert sent_prefill["headers"]["x-request-id"] == sent_decode["headers"]["x-request-id"] == "client-id-1"
    copy = sent_prefill["body"]
    assert copy["stream"] is False and copy["max_tokens"] == 1 and "min_tokens" not in copy
    assert "stream_options" not in copy
    assert copy["kv_transfer_params"] == PREFILL_KV
    handed = sent_decode["body"]["kv_transfer_params"]  # the prefill's answer, unchanged
    assert handed["do_remote_prefill"] is True and handed["remote_port"] == prefill.port
    assert handed["remote_request_id"].startswith(("chatcmpl-client-id-1-", "cmpl-client-id-1-0-"))
    assert isinstance(handed["remote_block_ids"][0], list) and handed["transfer_mode"] == "pull"
    assert sent_decode["body"]["max_tokens"] == 12 and sent_decode["body"].get("stream", False) is stream
    assert prefill.stats()["pd"]["prefills"] == 1 and decode.stats()["pd"]["decodes"] == 1
    assert wait_kv_settled([prefill])[0]["freed"] == 1  # the decode's pull released the blocks


def test_min_tokens_are_dropped_from_the_prefill_copy_and_kept_for_the_decode(pd):
    # vLLM answers 400 when min_tokens exceeds the prefill's max_tokens of 1; its proxies drop both spellings.
    stack, prefill, decode = pd
    body = chat(MODEL, max_completion_tokens=12, min_tokens=4, min_completion_tokens=4)
    response = post(stack, body)
    assert response.status_code == 200, response.text
    copy = inference(prefill)[-1]["body"]
    assert "min_tokens" not in copy and "min_completion_tokens" not in copy
    assert copy["max_tokens"] == 1 and copy["max_completion_tokens"] == 1
    sent = inference(decode)[-1]["body"]
    assert (sent["min_tokens"], sent["min_completion_tokens"], sent["max_completion_tokens"]) == (4, 4, 12)


@pytest.fixture(scope="module")
def example_engines():
    """A vLLM pair with the ExampleConnector: the prefill answers ``"kv_transfer_params": null``."""
    common = {"engine": "vllm", "served_model_name": MODEL, "extra_args": ["--kv-connector=ExampleConnector"]}
    with run_simulator(role="prefill", **common) as prefill, run_simulator(role="decode", **common) as decode:
        yield prefill, decode


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_prefill_without_kv_transfer_params_is_followed_by_a_plain_decode(stack, example_engines, make, stream):
    prefill, decode = example_engines
    prefill.reset()
    decode.reset()
    stack.add_node(prefill.url, [MODEL], role="prefill", engine_type="vllm", settle=False)
    stack.add_node(decode.url, [MODEL], role="decode", engine_type="vllm", settle=False)
    stack.set_policy(MODEL, serving_mode="pd", retry_budget=0, settle=False)
    stack.settle()
    body = make(MODEL, max_tokens=12, **({"stream": True} if stream else {}))
    response = post(stack, body)
    assert response.status_code == 200, response.text
    text = streamed_text(events(response.text)) if stream else answer_text(response.json())
    assert text == expected_text(body)
    assert inference(prefill)[-1]["body"]["kv_transfer_params"] == PREFILL_KV
    sent = inference(decode)[-1]["body"]
    assert "kv_transfer_params" not in sent and sent["max_tokens"] == 12
    assert (prefill.stats()["pd"]["prefills"], decode.stats()["pd"]["plain_decodes"]) == (1, 1)
    assert wait_router_idle(stack) == {"node_inflight": 0, "pd_inflight": 0, "pd_cleanups_pending": 0}


def test_data_parallel_decode_ranks_are_logical_nodes(pd):
    stack, _prefill, decode = pd
    labels = set()
    for i in range(6):
        response = post(stack, chat(MODEL, f"rank question {i}", max_tokens=4))
        assert response.status_code == 200, response.text
        labels.add(response.headers["x-routerpanel-node"].split("decode=")[1])
    assert labels == {f"{decode.url}@0", f"{decode.url}@1"}
    assert decode.stats()["requests"]["by_dp_rank"] == {"0": 3, "1": 3}


def test_a_failed_vllm_prefill_is_an_error_not_a_recompute(pd):
    stack, prefill, decode = pd
    prefill.set_faults(error_rate=1.0, error_status=500, count=1)
    response = post(stack, chat(MODEL, max_tokens=4))
    assert response.status_code == 500
    assert "injected fault" in response.json()["error"]["message"]
    assert not inference(decode)


def test_a_failed_vllm_decode_is_a_502(pd):
    stack, _prefill, decode = pd
    decode.set_faults(error_rate=1.0, error_status=500, count=1)
    response = post(stack, chat(MODEL, max_tokens=4))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "decode_failed"
