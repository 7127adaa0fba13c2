"""vLLM two-stage PD (NIXL-style KV transfer) through real processes: one request id on both legs,
the prefill copy clamped to one token, the decode given the prefill's ``kv_transfer_params``, and
data-parallel decode ranks addressed as ``url@rank`` with ``X-data-parallel-rank``."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_vllm_pd_shares_one_request_id_and_hands_over_the_kv_params(pd, make, stream):
    stack, prefill, decode = pd
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    body = make(MODEL, max_tokens=12, **extra)
    response = post(stack, body)
    assert response.status_code == 200, response.text
    text = streamed_text(events(response.text)) if stream else answer_text(response.json())
    assert text == expected_text(body)

    sent_prefill = inference(prefill)[-1]
    sent_decode = inference(decode)[-1]
    request_id = sent_prefill["headers"]["x-request-id"]
    assert re.fullmatch(
        rf"___prefill_addr_127\.0\.0\.1:{prefill.port}___decode_addr_127\.0\.0\.1:{decode.port}_[0-9a-f]{{32}}",
        request_id,
    )
    assert sent_decode["headers"]["x-request-id"] == request_id
    copy = sent_prefill["body"]
    assert copy["stream"] is False and copy["max_tokens"] == 1 and copy["min_tokens"] == 1
    assert "stream_options" not in copy
    assert copy["kv_transfer_params"] == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    handed = sent_decode["body"]["kv_transfer_params"]
    assert handed["do_remote_prefill"] is True and handed["remote_port"] == prefill.port
    assert sent_decode["body"]["max_tokens"] == 12 and sent_decode["body"].get("stream", False) is stream
    assert prefill.stats()["pd"]["prefills"] == 1 and decode.stats()["pd"]["decodes"] == 1
    assert wait_kv_settled([prefill])[0]["freed"] == 1  # the decode's read released the blocks


def test_data_parallel_decode_ranks_are_logical_nodes(pd):
    stack, _prefill, decode = pd
    labels = set()
    for i in range(6):
        response = post(stack, chat(MODEL, f"rank question {i}", max_tokens=4))
        assert response.status_code == 200, response.text
        labels.add(response.headers["x-routerpanel-node"].split("decode=")[1])
    assert labels == {f"{decode.url}@0", f"{decode.url}@1"}
    assert decode.stats()["requests"]["by_dp_rank"] == {"0": 3, "1": 3}


def test_the_kv_connector_address_names_the_node_in_the_request_id(stack, engines):
    prefill, decode = engines
    prefill.reset()
    decode.reset()
    stack.add_node(prefill.url, [MODEL], role="prefill", engine_type="vllm", kv_connector_address="10.0.0.7:14579")
    stack.add_node(decode.url, [MODEL], role="decode", engine_type="vllm")
    assert post(stack, chat(MODEL, max_tokens=4)).status_code == 200
    request_id = inference(decode)[-1]["headers"]["x-request-id"]
    assert request_id.startswith(f"___prefill_addr_10.0.0.7:14579___decode_addr_127.0.0.1:{decode.port}_")


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
