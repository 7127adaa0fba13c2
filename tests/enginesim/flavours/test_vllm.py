"""The vLLM flavour against real prefill and decode simulators: vLLM 0.32's refusals and error bodies,
NIXL-style PD (the decode pulls the blocks named by ``remote_request_id``), the ExampleConnector's
``"kv_transfer_params": null``, and data-parallel ranks. tests/realengines/test_vllm_and_simulator_agree.py
holds the same refusals against a real vLLM."""

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
        run_simulator(engine="vllm", role="prefill", extra_args=["--dp-size=2", "--max-model-len=64"]) as prefill,
        run_simulator(engine="vllm", role="decode", extra_args=["--pd-timeout-s=5"]) as decode,
    ):
        yield prefill, decode


@pytest.fixture(autouse=True)
def _reset(pair) -> None:
    for sim in pair:
        sim.reset()


def request_id() -> str:
    return uuid.uuid4().hex


def prefill_call(prefill: Simulator, rid: str, prompt: str = "[[len=8]] hi", **headers) -> httpx.Response:
    body = {"model": "sim-model", "prompt": prompt, "stream": False, "max_tokens": 1}
    body["kv_transfer_params"] = PREFILL_PARAMS
    return httpx.post(prefill.url + "/v1/completions", json=body, headers={"X-Request-Id": rid, **headers}, timeout=10)


def decode_call(decode: Simulator, params, prompt: str = "[[len=8]] hi", **fields) -> httpx.Response:
    body = {"model": "sim-model", "prompt": prompt, **fields}
    if params is not None:
        body["kv_transfer_params"] = params
    return httpx.post(decode.url + "/v1/completions", json=body, headers={"X-Request-Id": request_id()}, timeout=10)


def test_the_prefill_returns_vllm_032_nixl_params_and_holds_the_blocks(pair):
    prefill, _ = pair
    rid = request_id()
    response = prefill_call(prefill, rid)
    assert "x-request-id" not in response.headers  # vLLM echoes it only with --enable-request-id-headers
    data = response.json()
    assert data["id"] == f"cmpl-{rid}"
    params = data["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_request_id"].startswith(f"cmpl-{rid}-0-")
    assert isinstance(params["remote_engine_id"], str) and params["transfer_mode"] == "pull"
    assert isinstance(params["remote_block_ids"], list) and all(isinstance(g, list) for g in params["remote_block_ids"])
    assert (params["remote_host"], params["remote_port"], params["tp_size"]) == ("127.0.0.1", prefill.port, 1)
    assert params["remote_num_tokens"] == 2 and params["remote_blocks_expiry_time"] is None
    assert [e["id"] for e in prefill.stats()["kv"]["outstanding"]] == [params["remote_request_id"]]


def test_an_eos_at_prefill_still_returns_the_params(pair):
    prefill, _ = pair
    params = prefill_call(prefill, request_id(), prompt="[[eos]] stop").json()["kv_transfer_params"]
    assert params["do_remote_prefill"] is True


def test_the_decode_pulls_the_blocks_named_by_remote_request_id_and_answers_in_full(pair):
    prefill, decode = pair
    params = prefill_call(prefill, request_id()).json()["kv_transfer_params"]
    answer = decode_call(decode, params, max_tokens=5)  # under another X-Request-Id: NIXL does not need it
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["text"] == expected_completion("[[len=8]] hi", 5)
    kv = prefill.stats()["kv"]
    assert (kv["freed"], kv["outstanding_count"]) == (1, 0)
    assert decode.stats()["pd"]["decodes"] == 1


def test_a_pull_of_blocks_the_prefill_does_not_hold_is_a_500(pair):
    prefill, decode = pair
    params = prefill_call(prefill, request_id()).json()["kv_transfer_params"]
    response = decode_call(decode, {**params, "remote_request_id": "cmpl-unknown-0-00000000"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert "KV transfer failed" in error["message"] and (error["type"], error["code"]) == ("InternalServerError", 500)
    assert prefill.stats()["kv"]["outstanding_count"] == 1
    assert decode.stats()["pd"]["transfer_failures"] == 1


def test_a_decode_without_params_computes_the_prompt_itself(pair):
    _, decode = pair
    for params in (None, PREFILL_PARAMS | {"do_remote_decode": False}):
        response = decode_call(decode, params, max_tokens=4)
        assert response.status_code == 200, response.text
        assert response.json()["kv_transfer_params"] is None
    assert decode.stats()["pd"]["plain_decodes"] == 2


def test_the_decode_fails_when_the_prefill_is_unreachable(pair):
    _, decode = pair
    params = {"do_remote_prefill": True, "remote_engine_id": "x", "remote_request_id": "r", "remote_block_ids": [[0]]}
    params.update(remote_host="127.0.0.1", remote_port=1)
    assert decode_call(decode, params).status_code == 500


def test_the_example_connector_returns_null_params_and_ignores_any_it_is_given():
    with run_simulator(engine="vllm", role="prefill", extra_args=["--kv-connector=ExampleConnector"]) as prefill:
        response = prefill_call(prefill, request_id())
        assert response.status_code == 200
        data = response.json()
        assert "kv_transfer_params" in data and data["kv_transfer_params"] is None
        bogus = {"do_remote_prefill": True, "remote_request_id": "nowhere"}
        assert decode_call(prefill, bogus, max_tokens=3).status_code == 200
        assert prefill.stats()["kv"]["allocated"] == 0 and prefill.stats()["pd"]["prefills"] == 1


def test_data_parallel_ranks_are_counted_checked_against_dp_size_and_ignored_when_not_integers(pair):
    prefill, _ = pair
    body = {"model": "sim-model", "prompt": "x y", "max_tokens": 1}
    for rank in ("0", "1", "1", "abc"):
        headers = {"X-data-parallel-rank": rank}
        assert httpx.post(prefill.url + "/v1/completions", json=body, headers=headers).status_code == 200
    bad = httpx.post(prefill.url + "/v1/completions", json=body, headers={"X-data-parallel-rank": "2"})
    assert bad.status_code == 400
    assert bad.json() == {
        "error": {
            "message": "data_parallel_rank 2 is out of range [0, 2).",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }
    assert prefill.stats()["requests"]["by_dp_rank"] == {"0": 1, "1": 2, "abc": 1, "2": 1}


CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi there"}]}
COMPLETION = {"model": "sim-model", "prompt": "hi there"}


def bad_request(message: str, param: str | None = None, kind: str = "BadRequestError", status: int = 400) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (
            "/v1/completions",
            {**COMPLETION, "max_tokens": 1, "min_tokens": 4},
            bad_request("min_tokens must be less than or equal to max_tokens=1, got 4."),
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "max_completion_tokens": 1, "min_tokens": 4},
            bad_request("min_tokens must be less than or equal to max_tokens=1, got 4."),
        ),
        (
            "/v1/completions",
            {**COMPLETION, "kv_transfer_params": "x"},
            bad_request(
                "1 validation error:\n  {'type': 'dict_type', 'loc': 'body.kv_transfer_params', "
                "'msg': 'Input should be a valid dictionary', 'input': 'x'}",
                "body.kv_transfer_params",
                "Bad Request",
            ),
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "max_tokens": 500},
            bad_request(
                "max_tokens=500 cannot be greater than max_model_len=64. Please request fewer output tokens. "
                "(parameter=max_tokens, value=500)",
                "max_tokens",
            ),
        ),
        (
            "/v1/completions",
            {**COMPLETION, "prompt": " ".join(["w"] * 70)},
            bad_request(
                "This model's maximum context length is 64 tokens. However, your prompt contains at least 65 input "
                "tokens, which exceeds this limit even without any output tokens. Please reduce the length of the "
                "input prompt. (parameter=input_tokens, value=65)",
                "input_tokens",
            ),
        ),
        (
            "/v1/completions",
            {**COMPLETION, "stream_options": {"include_usage": True}},
            bad_request(
                "Stream options can only be defined when `stream=True`. (parameter=stream_options)", "stream_options"
            ),
        ),
        (
            "/v1/completions",
            {**COMPLETION, "model": "nope"},
            bad_request("The model `nope` does not exist. Valid aliases: sim-model.", "model", "NotFoundError", 404),
        ),
        ("/v1/completions", {**COMPLETION, "n": 0}, bad_request("n must be at least 1, got 0.")),
        (
            "/v1/completions",
            {**COMPLETION, "max_tokens": 0},
            bad_request("max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)", "max_tokens"),
        ),
    ],
    ids=[
        "min-tokens",
        "min-tokens-chat",
        "kv-params-not-object",
        "max-tokens-over-len",
        "prompt-over-len",
        "stream-options",
        "unknown-model",
        "n-zero",
        "max-tokens-zero",
    ],
)
def test_what_vllm_refuses_gets_vllms_400_body(pair, path, body, expected):
    prefill, _ = pair
    response = httpx.post(prefill.url + path, json=body, timeout=10)
    assert (response.status_code, response.json()) == (expected["error"]["code"], expected)


def test_malformed_json_is_vllms_schema_400(pair):
    prefill, _ = pair
    response = httpx.post(
        prefill.url + "/v1/completions", content=b'{"prompt": ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.11', 'msg': 'JSON decode error', "
        "'input': '<dict of 0 items>', 'ctx': {'error': 'Expecting value'}}",
        "type": "Bad Request",
        "param": "body.11",
        "code": 400,
    }


def test_unknown_fields_and_lax_numbers_are_accepted(pair):
    prefill, _ = pair
    body = {**COMPLETION, "max_tokens": "3", "min_completion_tokens": 9, "bogus": {"a": 1}, "min_tokens": 1}
    response = httpx.post(prefill.url + "/v1/completions", json=body, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 3
    assert response.json()["kv_transfer_params"] is None


def test_completions_default_to_16_tokens_and_chat_to_what_the_context_leaves(pair):
    prefill, _ = pair
    long = {**COMPLETION, "prompt": "[[len=40]] hi"}
    assert httpx.post(prefill.url + "/v1/completions", json=long).json()["usage"]["completion_tokens"] == 16
    chat = {**CHAT, "messages": [{"role": "user", "content": "[[len=40]] " + "w " * 50}]}
    usage = httpx.post(prefill.url + "/v1/chat/completions", json=chat).json()["usage"]
    assert usage["completion_tokens"] == 64 - usage["prompt_tokens"]
