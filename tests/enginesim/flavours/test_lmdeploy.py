"""LMDeploy migration PD: prefill with cache, decode with a migration_request, free_cache."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from enginesim import expected_completion
from enginesim.testing import Simulator, run_simulator


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Simulator, Simulator]]:
    with (
        run_simulator(engine="lmdeploy", role="prefill") as prefill,
        run_simulator(engine="lmdeploy", role="decode") as decode,
    ):
        yield prefill, decode


@pytest.fixture(autouse=True)
def _reset(pair) -> None:
    for sim in pair:
        sim.reset()


def prefill_call(prefill: Simulator, prompt: str = "[[len=7]] hi") -> dict:
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": 1, "stream": False}
    body.update(with_cache=True, preserve_cache=True)
    response = httpx.post(prefill.url + "/v1/completions", json=body, timeout=10)
    assert response.status_code == 200
    return response.json()


def migration_request(prefill: Simulator, info: dict) -> dict:
    """What LMDeploy's proxy builds from the prefill's answer."""
    return {
        "protocol": "rdma",
        "remote_engine_id": prefill.url,
        "remote_session_id": int(info["id"]),
        "remote_block_ids": info["cache_block_ids"],
        "remote_token_id": info["remote_token_ids"][-1],
    }


def decode_call(decode: Simulator, migration, prompt: str = "[[len=7]] hi", **fields) -> httpx.Response:
    body = {"model": "sim-model", "prompt": prompt, "migration_request": migration, **fields}
    return httpx.post(decode.url + "/v1/completions", json=body, timeout=10)


def test_the_prefill_returns_its_session_and_cache_blocks_and_holds_them(pair):
    prefill, _ = pair
    info = prefill_call(prefill)
    assert info["id"].isdigit()
    assert info["cache_block_ids"] and info["remote_token_ids"]
    assert [e["id"] for e in prefill.stats()["kv"]["outstanding"]] == [int(info["id"])]


def test_the_decode_migrates_the_session_and_answers_in_full(pair):
    prefill, decode = pair
    info = prefill_call(prefill)
    answer = decode_call(decode, migration_request(prefill, info), max_tokens=30)
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["text"] == expected_completion("[[len=7]] hi", 30)
    assert decode.stats()["pd"]["migrations_in"] == 1


def test_the_decode_fails_when_the_prefill_does_not_hold_that_session(pair):
    prefill, decode = pair
    info = prefill_call(prefill)
    wrong = {**migration_request(prefill, info), "remote_session_id": int(info["id"]) + 100}
    response = decode_call(decode, wrong)
    assert response.status_code == 500
    assert "migration failed" in response.json()["error"]["message"]
    mismatched = {**migration_request(prefill, info), "remote_block_ids": [999]}
    assert decode_call(decode, mismatched).status_code == 500


def test_the_decode_needs_a_migration_request(pair):
    _, decode = pair
    assert decode_call(decode, None).status_code == 400
    assert decode_call(decode, {"remote_session_id": "1"}).status_code == 400


def test_free_cache_releases_the_session_once(pair):
    prefill, _ = pair
    session = int(prefill_call(prefill)["id"])
    free = httpx.post(prefill.url + "/distserve/free_cache", json={"session_id": session}, timeout=10)
    assert free.json() == {"session_id": session, "freed": True}
    again = httpx.post(prefill.url + "/distserve/free_cache", json={"session_id": session}, timeout=10)
    assert again.json()["freed"] is False
    kv = prefill.stats()["kv"]
    assert (kv["freed"], kv["double_free"], kv["outstanding_count"]) == (1, 1, 0)


def test_without_preserve_cache_nothing_stays_held(pair):
    prefill, _ = pair
    body = {"model": "sim-model", "prompt": "x", "max_tokens": 1, "with_cache": True}
    assert httpx.post(prefill.url + "/v1/completions", json=body, timeout=10).status_code == 200
    assert prefill.stats()["kv"]["outstanding_count"] == 0


def test_the_connection_handshake_endpoints_answer_and_are_counted(pair):
    prefill, decode = pair
    for sim in (prefill, decode):
        assert httpx.post(sim.url + "/distserve/p2p_initialize", json={}, timeout=10).status_code == 200
    assert httpx.post(decode.url + "/distserve/p2p_connect", json={}, timeout=10).status_code == 200
    assert decode.stats()["pd"]["handshakes"] == {"p2p_initialize": 1, "p2p_connect": 1}
