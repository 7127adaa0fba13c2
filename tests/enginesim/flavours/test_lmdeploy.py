"""LMDeploy DistServe PD as strict as LMDeploy 0.18: the p2p link, prefill with cache, decode with a
migration_request (which frees the prefill's session itself), free_cache, and LMDeploy's errors."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from enginesim import expected_completion
from enginesim.testing import Simulator, run_simulator

RDMA = 2


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Simulator, Simulator]]:
    with (
        run_simulator(engine="lmdeploy", role="prefill") as prefill,
        run_simulator(engine="lmdeploy", role="decode") as decode,
    ):
        link(prefill, decode)
        yield prefill, decode


@pytest.fixture(autouse=True)
def _reset(pair) -> None:
    for sim in pair:
        sim.reset()


def post(sim: Simulator, path: str, body) -> httpx.Response:
    return httpx.post(sim.url + path, json=body, timeout=10)


def engine_info(sim: Simulator) -> dict:
    response = httpx.get(sim.url + "/distserve/engine_info", timeout=10)
    assert response.status_code == 200
    text = response.json()
    assert isinstance(text, str)  # model_dump_json() returned by FastAPI: a JSON string of JSON
    return json.loads(text)


def init_body(local: Simulator, remote: Simulator) -> dict:
    return {
        "local_engine_id": local.url,
        "local_engine_config": engine_info(local),
        "remote_engine_id": remote.url,
        "remote_engine_config": engine_info(remote),
        "protocol": RDMA,
        "rdma_config": {"with_gdr": True, "link_type": 2},
    }


def link(prefill: Simulator, decode: Simulator) -> None:
    """What LMDeploy's proxy does once per pair."""
    inits = {}
    for local, remote in ((prefill, decode), (decode, prefill)):
        response = post(local, "/distserve/p2p_initialize", init_body(local, remote))
        assert response.status_code == 200, response.text
        inits[local.url] = response.json()
    for local, remote in ((prefill, decode), (decode, prefill)):
        peer = inits[remote.url]
        body = {
            "protocol": RDMA,
            "remote_engine_id": remote.url,
            "remote_engine_endpoint_info": peer["engine_endpoint_info"],
            "remote_kvtransfer_endpoint_info": peer["kvtransfer_endpoint_info"],
        }
        response = post(local, "/distserve/p2p_connect", body)
        assert response.json() == {"status": 1}, response.text


def prefill_call(prefill: Simulator, prompt: str = "[[len=7]] hi", path: str = "/v1/completions", **fields) -> dict:
    body = {"model": "sim-model", "max_tokens": 1, "stream": False, "with_cache": True, "preserve_cache": True}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    response = post(prefill, path, {**body, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def migration_request(prefill: Simulator, info: dict, session: int) -> dict:
    return {
        "protocol": RDMA,
        "remote_engine_id": prefill.url,
        "remote_session_id": session,
        "remote_block_ids": info["cache_block_ids"],
        "remote_token_id": info["remote_token_ids"][-1],
        "is_dummy_prefill": False,
    }


def decode_call(decode: Simulator, migration, prompt: str = "[[len=7]] hi", **fields) -> httpx.Response:
    return post(
        decode, "/v1/completions", {"model": "sim-model", "prompt": prompt, "migration_request": migration, **fields}
    )


def held(sim: Simulator) -> list:
    return [e["id"] for e in sim.stats()["kv"]["outstanding"]]


def test_the_prefill_returns_its_cache_blocks_and_first_token_and_holds_them(pair):
    prefill, _ = pair
    info = prefill_call(prefill)
    assert info["id"] == "-1"  # completions echo the client's session_id, default -1
    assert info["cache_block_ids"] and len(info["remote_token_ids"]) == 1
    assert len(held(prefill)) == 1
    chat = prefill_call(prefill, path="/v1/chat/completions")
    assert chat["id"].startswith("chatcmpl-")  # since LMDeploy 0.15: no session in the chat id
    assert "cache_session_id" not in chat


def test_the_decode_migrates_and_frees_the_prefills_session_when_it_is_named(pair):
    prefill, decode = pair
    info = prefill_call(prefill)
    (session,) = held(prefill)
    answer = decode_call(decode, migration_request(prefill, info, session), max_tokens=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == expected_completion("[[len=7]] hi", 30)
    assert held(prefill) == [] and prefill.stats()["pd"]["zmq_frees"] == 1
    assert decode.stats()["pd"]["migrations_in"] == 1


def test_a_session_id_that_names_nothing_migrates_but_leaves_the_cache_held(pair):
    prefill, decode = pair
    info = prefill_call(prefill)
    answer = decode_call(decode, migration_request(prefill, info, -1))
    assert answer.status_code == 200
    assert len(held(prefill)) == 1 and prefill.stats()["pd"]["invalid_frees"] == 1  # LMDeploy's leak
    post(prefill, "/distserve/free_cache", {"remote_engine_id": prefill.url, "remote_session_id": held(prefill)[0]})


def test_the_decode_fails_with_500_when_the_blocks_or_the_link_are_wrong(pair):
    prefill, decode = pair
    info = prefill_call(prefill)
    (session,) = held(prefill)
    wrong = {**migration_request(prefill, info, session), "remote_token_id": info["remote_token_ids"][0] + 1}
    response = decode_call(decode, wrong)
    assert response.status_code == 500 and "migration failed" in response.json()["message"]
    stranger = {**migration_request(prefill, info, session), "remote_engine_id": "http://127.0.0.1:1"}
    assert decode_call(decode, stranger).status_code == 500
    short = {**migration_request(prefill, info, session), "remote_block_ids": []}
    assert decode_call(decode, short).status_code == 500
    assert decode.stats()["pd"]["migration_failures"] == 3
    post(prefill, "/distserve/free_cache", {"remote_engine_id": prefill.url, "remote_session_id": session})


@pytest.mark.parametrize(
    "broken",
    [
        {"protocol": "RDMA"},  # the enum's name: LMDeploy validates enums by value
        {"protocol": "2"},
        {"remote_session_id": "chatcmpl-x"},
        {"remote_block_ids": None},
    ],
)
def test_a_malformed_migration_request_is_a_500_as_it_is_validated_inside_the_handler(pair, broken):
    prefill, decode = pair
    info = prefill_call(prefill)
    (session,) = held(prefill)
    response = decode_call(decode, {**migration_request(prefill, info, session), **broken})
    assert response.status_code == 500 and response.text == "Internal Server Error"
    post(prefill, "/distserve/free_cache", {"remote_engine_id": prefill.url, "remote_session_id": session})


def test_a_decode_engine_without_a_migration_request_serves_the_request_itself(pair):
    _, decode = pair
    response = decode_call(decode, None, max_tokens=3)
    assert response.json()["choices"][0]["text"] == expected_completion("[[len=7]] hi", 3)


def test_free_cache_takes_the_remote_session_and_answers_success_whatever_it_held(pair):
    prefill, _ = pair
    prefill_call(prefill)
    (session,) = held(prefill)
    body = {"remote_engine_id": prefill.url, "remote_session_id": session}
    assert post(prefill, "/distserve/free_cache", body).json() == {"status": "SUCCESS"}
    assert post(prefill, "/distserve/free_cache", body).json() == {"status": "SUCCESS"}
    kv = prefill.stats()["kv"]
    assert (kv["freed"], kv["double_free"], kv["outstanding_count"]) == (1, 1, 0)


@pytest.mark.parametrize(
    "body",
    [{"session_id": 0}, {"remote_engine_id": "http://p", "remote_session_id": "x"}, {"remote_session_id": 1}],
)
def test_a_bad_free_cache_body_gets_lmdeploys_flat_400(pair, body):
    prefill, _ = pair
    response = post(prefill, "/distserve/free_cache", body)
    assert response.status_code == 400
    error = response.json()
    assert set(error) == {"message", "type", "code", "param", "object"}
    assert error["object"] == "error" and error["code"] == 400 and error["type"] == "invalid_request_error"


def test_a_session_freed_by_the_decode_and_again_by_free_cache_is_only_logged(pair):
    prefill, decode = pair
    info = prefill_call(prefill)
    (session,) = held(prefill)
    assert decode_call(decode, migration_request(prefill, info, session)).status_code == 200
    post(prefill, "/distserve/free_cache", {"remote_engine_id": prefill.url, "remote_session_id": session})
    stats = prefill.stats()
    assert stats["kv"]["double_free"] == 0 and stats["pd"]["invalid_frees"] == 1


def test_without_preserve_cache_nothing_stays_held(pair):
    prefill, _ = pair
    body = {"model": "sim-model", "prompt": "x", "max_tokens": 1, "with_cache": True}
    assert post(prefill, "/v1/completions", body).status_code == 200
    assert prefill.stats()["kv"]["outstanding_count"] == 0


def test_chat_with_n_above_one_refuses_cache_migration(pair):
    prefill, _ = pair
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "x"}], "n": 2, "with_cache": True}
    response = post(prefill, "/v1/chat/completions", body)
    assert response.status_code == 400 and response.json()["message"] == "n > 1 is not supported with cache migration."


def test_the_handshake_validates_lmdeploys_models(pair):
    prefill, decode = pair
    good = init_body(prefill, decode)
    for broken in (
        {"protocol": "RDMA"},
        {"local_engine_config": {**good["local_engine_config"], "block_size": None}},
        {"remote_engine_config": {k: v for k, v in good["remote_engine_config"].items() if k != "pp_size"}},
    ):
        response = post(prefill, "/distserve/p2p_initialize", {**good, **broken})
        assert response.status_code == 400, broken
    assert (
        post(prefill, "/distserve/p2p_initialize", {"protocol": RDMA, "remote_engine_id": decode.url}).status_code
        == 400
    )
    # The engine binds its ZMQ socket on the local engine id's host.
    assert (
        post(prefill, "/distserve/p2p_initialize", {**good, "local_engine_id": "http://10.255.0.1:1"}).status_code
        == 500
    )


def test_initialisation_answers_an_endpoint_per_tp_rank_and_connect_needs_the_peers():
    with (
        run_simulator(engine="lmdeploy", role="prefill", extra_args=["--tp-size=2"]) as prefill,
        run_simulator(engine="lmdeploy", role="decode", extra_args=["--tp-size=2"]) as decode,
    ):
        answer = post(prefill, "/distserve/p2p_initialize", init_body(prefill, decode)).json()
        assert answer["status"] == 1 and answer["engine_endpoint_info"]["zmq_address"].startswith("tcp://127.0.0.1:")
        endpoints = answer["kvtransfer_endpoint_info"]
        assert len(endpoints) == 2 and all(
            e["protocol"] == RDMA and isinstance(e["endpoint_info"], str) for e in endpoints
        )
        own = {
            "protocol": RDMA,
            "remote_engine_id": decode.url,
            "remote_engine_endpoint_info": answer["engine_endpoint_info"],
            "remote_kvtransfer_endpoint_info": endpoints,
        }
        assert post(prefill, "/distserve/p2p_connect", own).status_code == 500  # its own answer, not the peer's
        assert post(prefill, "/distserve/p2p_connect", {**own, "remote_engine_endpoint_info": {}}).status_code == 400
        link(prefill, decode)
        assert prefill.stats()["pd"]["links"] == [decode.url]


def test_lmdeploy_0_15_and_earlier_answer_422_and_0_14_names_the_session_in_the_chat_id():
    with run_simulator(engine="lmdeploy", role="prefill", extra_args=["--lmdeploy-version=0.14.1"]) as old:
        response = post(old, "/distserve/free_cache", {"remote_engine_id": old.url, "remote_session_id": "x"})
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "remote_session_id"]
        info = prefill_call(old, path="/v1/chat/completions")
        assert info["id"] == "0"


def test_cache_session_id_names_the_session_when_the_engine_offers_it():
    with run_simulator(engine="lmdeploy", role="prefill", extra_args=["--cache-session-id"]) as sim:
        info = prefill_call(sim, path="/v1/chat/completions")
        assert info["cache_session_id"] == held(sim)[0]
