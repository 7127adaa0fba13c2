"""NanoDeploy / DLEngine PD (docs/pd.md) against real prefill and decode simulators: migration, EOS, KV ledger."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import httpx
import pytest

from enginesim import expected_completion
from enginesim.testing import Simulator, run_simulator


@pytest.fixture(scope="module", params=["nanodeploy", "dlengine"])
def pair(request) -> Iterator[tuple[Simulator, Simulator]]:
    """A prefill and a decode engine of the same kind."""
    with (
        run_simulator(engine=request.param, role="prefill") as prefill,
        run_simulator(engine=request.param, role="decode") as decode,
    ):
        yield prefill, decode


@pytest.fixture(autouse=True)
def _reset(pair) -> None:
    for sim in pair:
        sim.reset()


def prefill_call(prefill: Simulator, prompt: str, **fields) -> httpx.Response:
    body = {"model": "sim-model", "prompt": prompt, "stream": False, "kv_transfer_params": {"do_remote_decode": True}}
    return httpx.post(prefill.url + "/v1/completions", json={**body, **fields}, timeout=10)


def decode_call(decode: Simulator, prompt: str, params: dict, **fields) -> httpx.Response:
    body = {"model": "sim-model", "prompt": prompt, "kv_transfer_params": params, **fields}
    return httpx.post(decode.url + "/v1/completions", json=body, timeout=10)


def free(sim: Simulator, body) -> httpx.Response:
    return httpx.post(sim.url + "/pd/free", json=body, timeout=10)


def test_the_prefill_answers_an_empty_completion_with_migration_seq_id_and_first_token(pair):
    prefill, _ = pair
    body = prefill_call(prefill, "[[len=10]] hello", max_tokens=8).json()
    assert body["choices"][0]["text"] == ""
    params = body["kv_transfer_params"]
    assert params["seq_id"] == 1024
    assert isinstance(params["first_token"], int)
    migrated = json.loads(base64.b64decode(params["migration"]))
    assert migrated["seq_id"] == 1024 and migrated["remaining_tokens"] == 7
    assert migrated["first_token"] == params["first_token"] and migrated["prompt_token_ids"]
    assert prefill_call(prefill, "again").json()["kv_transfer_params"]["seq_id"] == 1025


def test_the_decode_continues_the_migrated_sequence_into_the_full_answer(pair):
    prefill, decode = pair
    params = prefill_call(prefill, "[[len=10]] hello", max_tokens=8).json()["kv_transfer_params"]
    answer = decode_call(decode, "[[len=10]] hello", params, max_tokens=8).json()
    assert answer["choices"][0]["text"] == expected_completion("[[len=10]] hello", 8)
    assert answer["choices"][0]["finish_reason"] == "length"


def test_the_decode_streams_when_the_client_asked_for_a_stream(pair):
    prefill, decode = pair
    params = prefill_call(prefill, "[[len=5]] s").json()["kv_transfer_params"]
    response = decode_call(decode, "[[len=5]] s", params, stream=True)
    events = [e[len("data: ") :] for e in response.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == expected_completion("[[len=5]] s")


def test_the_decode_answers_400_invalid_migration_payload_without_a_migration_or_a_positive_seq_id(pair):
    prefill, decode = pair
    params = prefill_call(prefill, "[[len=5]] real").json()["kv_transfer_params"]
    for bad in (None, {"seq_id": 1024}, {**params, "seq_id": 0}, {**params, "seq_id": None}, {"migration": "x"}):
        response = decode_call(decode, "x", bad)
        assert response.status_code == 400, bad
        error = response.json()["error"]
        assert "invalid migration payload" in error["message"] and error["type"] == "invalid_request_error"


def test_a_corrupt_migration_is_an_engine_error(pair):
    prefill, decode = pair
    params = prefill_call(prefill, "[[len=5]] real").json()["kv_transfer_params"]
    payload = json.loads(base64.b64decode(params["migration"]))
    payload["max_tokens"] = 999  # tampered without fixing the checksum
    tampered = {**params, "migration": base64.b64encode(json.dumps(payload).encode()).decode()}
    for bad in (tampered, {**params, "migration": "not base64!"}):
        response = decode_call(decode, "[[len=5]] real", bad)
        assert response.status_code == 500 and response.json()["error"]["type"] == "engine_error"
    assert decode.stats()["pd"]["rejected_migrations"] == 2


def test_the_decode_takes_a_numeric_string_seq_id_and_does_not_compare_prompts(pair):
    # DLEngine applies int() to seq_id and never compares the request's prompt with the migrated one.
    prefill, decode = pair
    params = prefill_call(prefill, "[[len=5]] real", max_tokens=8).json()["kv_transfer_params"]
    response = decode_call(decode, "another prompt", {**params, "seq_id": str(params["seq_id"])}, max_tokens=8)
    assert response.json()["choices"][0]["text"] == expected_completion("[[len=5]] real", 8)


def test_without_first_token_the_decode_answer_lacks_it_and_it_is_capped_by_its_own_max_tokens(pair):
    prefill, decode = pair
    params = prefill_call(prefill, "[[len=9]] cap", max_tokens=9).json()["kv_transfer_params"]
    full = expected_completion("[[len=9]] cap", 9)
    without = {k: v for k, v in params.items() if k != "first_token"}
    assert decode_call(decode, "[[len=9]] cap", without, max_tokens=9).json()["choices"][0]["text"] != full
    capped = decode_call(decode, "[[len=9]] cap", params, max_tokens=3).json()["choices"][0]
    assert capped["text"] == expected_completion("[[len=9]] cap", 3) and capped["finish_reason"] == "length"


def test_the_prefill_takes_the_first_prompt_and_ignores_n(pair):
    prefill, _ = pair
    body = prefill_call(prefill, ["first", "second"], n=3).json()
    assert len(body["choices"]) == 1 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0 and prefill.stats()["kv"]["allocated"] == 1


def test_eos_at_prefill_returns_the_full_completion_without_migration_or_held_kv(pair):
    prefill, _ = pair
    body = prefill_call(prefill, "stop at once [[eos]]").json()
    assert "kv_transfer_params" not in body or not body["kv_transfer_params"]
    assert body["choices"][0]["text"] == expected_completion("stop at once [[eos]]")
    assert body["choices"][0]["finish_reason"] == "stop"
    kv = prefill.stats()["kv"]
    assert (kv["allocated"], kv["outstanding_count"]) == (0, 0)


def test_the_prefill_holds_kv_until_freed_and_pd_free_echoes_the_ids_like_dlengine(pair):
    prefill, _ = pair
    first = prefill_call(prefill, "a").json()["kv_transfer_params"]["seq_id"]
    second = prefill_call(prefill, "b").json()["kv_transfer_params"]["seq_id"]
    kv = prefill.stats()["kv"]
    assert kv["allocated"] == 2
    assert sorted(e["id"] for e in kv["outstanding"]) == [first, second]
    assert all(e["age_s"] >= 0 for e in kv["outstanding"])

    # DLEngine queues the release and echoes the ids it was given, held or not; the ledger still
    # tells a double free from a release.
    assert free(prefill, {"seq_ids": [first]}).json() == {"freed": [first]}
    assert free(prefill, {"seq_ids": [first]}).json() == {"freed": [first]}
    kv = prefill.stats()["kv"]
    assert (kv["freed"], kv["double_free"], kv["outstanding_count"]) == (1, 1, 1)
    assert [e["id"] for e in kv["outstanding"]] == [second]
    assert free(prefill, {"seq_ids": [str(second), 7.0]}).json() == {"freed": [second, 7]}  # int() of each
    assert prefill.stats()["kv"]["unknown_free"] == 1


def test_pd_free_rejects_a_bad_body_with_dlengines_400(pair):
    prefill, _ = pair
    for body in ({}, {"seq_ids": "1024"}, {"seq_ids": ["a"]}, [1024]):
        response = free(prefill, body)
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(prefill.url + "/pd/free", content=b"{", timeout=10).status_code == 400


def test_a_prefill_engine_without_do_remote_decode_serves_the_whole_request(pair):
    prefill, _ = pair
    body = {"model": "sim-model", "prompt": "plain", "max_tokens": 4}
    answer = httpx.post(prefill.url + "/v1/completions", json=body, timeout=10).json()
    assert answer["choices"][0]["text"] == expected_completion("plain", 4)
    assert prefill.stats()["kv"]["allocated"] == 0


def test_a_chat_request_goes_through_prefill_and_decode_too(pair):
    prefill, decode = pair
    messages = [{"role": "user", "content": "[[len=6]] chat"}]
    body = {"model": "sim-model", "messages": messages, "kv_transfer_params": {"do_remote_decode": True}}
    params = httpx.post(prefill.url + "/v1/chat/completions", json=body, timeout=10).json()["kv_transfer_params"]
    answer = httpx.post(
        decode.url + "/v1/chat/completions",
        json={"model": "sim-model", "messages": messages, "kv_transfer_params": params},
        timeout=10,
    ).json()
    assert answer["choices"][0]["message"]["content"] == expected_completion("user: [[len=6]] chat")


def test_eos_at_prefill_can_be_forced_by_probability():
    with run_simulator(engine="nanodeploy", role="prefill", extra_args=["--eos-at-prefill-prob=1"]) as prefill:
        body = prefill_call(prefill, "[[len=9]] anything").json()
        assert not body.get("kv_transfer_params")
        assert body["choices"][0]["text"] == expected_completion("[[len=9]] anything", 1)
        assert prefill.stats()["pd"]["eos_at_prefill"] == 1


def test_a_prefill_the_client_abandoned_keeps_its_kv_for_the_router_to_free():
    # docs/pd.md, "Nothing leaks": a router must let the prefill call finish and free the seq_id it returns;
    # one that cancels the call instead leaves KV behind, and this ledger shows it.
    with run_simulator(engine="nanodeploy", role="prefill", ttft_ms=2000) as prefill:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                prefill.url + "/v1/completions",
                json={"model": "sim-model", "prompt": "x", "kv_transfer_params": {"do_remote_decode": True}},
                timeout=httpx.Timeout(10, read=0.3),
            )
        stats = prefill.wait_for(lambda s: s["requests"]["cancelled"] == 1)
        assert stats["kv"]["outstanding_count"] == 1


def test_a_prefill_answer_the_engine_itself_dropped_releases_its_kv(pair):
    prefill, _ = pair
    prefill.set_faults(close_after_chunks=0, count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        prefill_call(prefill, "dropped")
    kv = prefill.stats()["kv"]
    assert (kv["allocated"], kv["outstanding_count"]) == (1, 0)
