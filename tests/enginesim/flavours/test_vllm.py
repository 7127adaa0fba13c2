"""vLLM NIXL-style PD and data-parallel ranks against real prefill and decode simulators."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from enginesim import expected_completion
from enginesim.testing import Simulator, run_simulator

PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Simulator, Simulator]]:
    with (
        run_simulator(engine="vllm", role="prefill", extra_args=["--dp-size=2"]) as prefill,
        run_simulator(engine="vllm", role="decode", extra_args=["--pd-timeout-s=5"]) as decode,
    ):
        yield prefill, decode


@pytest.fixture(autouse=True)
def _reset(pair) -> None:
    for sim in pair:
        sim.reset()


def request_id() -> str:
    return f"___prefill_addr_p___decode_addr_d_{uuid.uuid4().hex}"


def prefill_call(prefill: Simulator, rid: str, prompt: str = "[[len=8]] hi", **headers) -> httpx.Response:
    body = {"model": "sim-model", "prompt": prompt, "stream": False, "max_tokens": 1, "min_tokens": 1}
    body["kv_transfer_params"] = PREFILL_PARAMS
    return httpx.post(prefill.url + "/v1/completions", json=body, headers={"X-Request-Id": rid, **headers}, timeout=10)


def decode_call(decode: Simulator, rid: str | None, params, prompt: str = "[[len=8]] hi", **fields) -> httpx.Response:
    body = {"model": "sim-model", "prompt": prompt, "kv_transfer_params": params, **fields}
    headers = {"X-Request-Id": rid} if rid else {}
    return httpx.post(decode.url + "/v1/completions", json=body, headers=headers, timeout=10)


def test_the_prefill_returns_nixl_kv_transfer_params_and_holds_the_blocks(pair):
    prefill, _ = pair
    rid = request_id()
    response = prefill_call(prefill, rid)
    assert response.headers["x-request-id"] == rid
    params = response.json()["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_block_ids"] and isinstance(params["remote_engine_id"], str)
    assert (params["remote_host"], params["remote_port"], params["tp_size"]) == ("127.0.0.1", prefill.port, 1)
    assert [e["id"] for e in prefill.stats()["kv"]["outstanding"]] == [rid]


def test_the_decode_reads_the_blocks_with_the_same_request_id_and_answers_in_full(pair):
    prefill, decode = pair
    rid = request_id()
    params = prefill_call(prefill, rid).json()["kv_transfer_params"]
    answer = decode_call(decode, rid, params, max_tokens=5)
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["text"] == expected_completion("[[len=8]] hi", 5)
    kv = prefill.stats()["kv"]
    assert (kv["freed"], kv["outstanding_count"]) == (1, 0)


def test_the_decode_fails_when_the_prefill_never_saw_that_request_id(pair):
    prefill, decode = pair
    params = prefill_call(prefill, request_id()).json()["kv_transfer_params"]
    response = decode_call(decode, request_id(), params)
    assert response.status_code == 500
    assert "KV transfer failed" in response.json()["error"]["message"]
    assert prefill.stats()["kv"]["outstanding_count"] == 1
    assert decode.stats()["pd"]["transfer_failures"] == 1


def test_the_decode_needs_the_prefills_params_and_a_request_id(pair):
    prefill, decode = pair
    rid = request_id()
    params = prefill_call(prefill, rid).json()["kv_transfer_params"]
    assert decode_call(decode, rid, None).status_code == 400
    assert decode_call(decode, rid, PREFILL_PARAMS).status_code == 400
    assert decode_call(decode, None, params).status_code == 400


def test_the_decode_fails_when_the_prefill_is_unreachable(pair):
    _, decode = pair
    params = {**PREFILL_PARAMS, "do_remote_prefill": True, "remote_engine_id": "x", "remote_block_ids": [0]}
    params.update(remote_host="127.0.0.1", remote_port=1)
    assert decode_call(decode, request_id(), params).status_code == 500


def test_data_parallel_ranks_are_counted_per_rank_and_checked_against_dp_size(pair):
    prefill, _ = pair
    body = {"model": "sim-model", "prompt": "x", "max_tokens": 1}
    for rank in ("0", "1", "1"):
        headers = {"X-data-parallel-rank": rank}
        assert httpx.post(prefill.url + "/v1/completions", json=body, headers=headers).status_code == 200
    bad = httpx.post(prefill.url + "/v1/completions", json=body, headers={"X-data-parallel-rank": "2"})
    assert bad.status_code == 400
    assert prefill.stats()["requests"]["by_dp_rank"] == {"0": 1, "1": 2, "2": 1}
