"""LMDeploy PD by migration through real processes: a one-token prefill that preserves its cache, the
p2p handshake once per pair, a decode with a ``migration_request``, and ``free_cache`` on every path
after the prefill answered."""

from __future__ import annotations

import json
import socket

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

MODEL = "lmdeploy-model"


@pytest.fixture(scope="module")
def engines():
    common = {"engine": "lmdeploy", "served_model_name": MODEL, "model_path": "/models/lmdeploy-model"}
    with run_simulator(role="prefill", **common) as prefill, run_simulator(role="decode", **common) as decode:
        yield prefill, decode


@pytest.fixture
def pd(stack, engines):
    prefill, decode = engines
    prefill.reset()
    decode.reset()
    stack.add_node(prefill.url, [MODEL], role="prefill", engine_type="lmdeploy", settle=False)
    stack.add_node(decode.url, [MODEL], role="decode", engine_type="lmdeploy", settle=False)
    stack.set_policy(
        MODEL, serving_mode="pd", retry_budget=0, first_token_timeout=3.0, total_timeout=10.0, settle=False
    )
    stack.settle()
    yield stack, prefill, decode
    ledger = wait_kv_settled([prefill])[0]
    assert ledger["freed"] == ledger["allocated"] and ledger["double_free"] == 0 and ledger["unknown_free"] == 0
    assert wait_router_idle(stack) == {"node_inflight": 0, "pd_inflight": 0, "pd_cleanups_pending": 0}


def inference(sim) -> list[dict]:
    return [r for r in sim.requests() if r["path"].startswith("/v1/")]


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_lmdeploy_pd_migrates_the_prefill_cache_and_frees_it(pd, make, stream):
    stack, prefill, decode = pd
    body = make(MODEL, max_tokens=10, **({"stream": True} if stream else {}))
    response = post(stack, body)
    assert response.status_code == 200, response.text
    text = streamed_text(events(response.text)) if stream else answer_text(response.json())
    assert text == expected_text(body)
    copy = inference(prefill)[-1]["body"]
    assert copy["max_tokens"] == 1 and copy["stream"] is False
    assert copy["with_cache"] is True and copy["preserve_cache"] is True
    migration = inference(decode)[-1]["body"]["migration_request"]
    assert migration["remote_engine_id"] == prefill.url
    assert set(migration) == {
        "protocol",
        "remote_engine_id",
        "remote_session_id",
        "remote_block_ids",
        "remote_token_id",
    }
    frees = [r["body"] for r in prefill.requests() if r["path"] == "/distserve/free_cache"]
    assert frees == [{"session_id": migration["remote_session_id"]}]
    assert decode.stats()["pd"]["migrations_in"] == 1


def test_the_p2p_handshake_happens_once_per_pair(stack):
    common = {"engine": "lmdeploy", "served_model_name": "fresh-pair", "model_path": "/models/fresh-pair"}
    with run_simulator(role="prefill", **common) as prefill, run_simulator(role="decode", **common) as decode:
        stack.add_node(prefill.url, ["fresh-pair"], role="prefill", engine_type="lmdeploy", settle=False)
        stack.add_node(decode.url, ["fresh-pair"], role="decode", engine_type="lmdeploy")
        for i in range(3):
            assert post(stack, chat("fresh-pair", f"handshake {i}", max_tokens=4)).status_code == 200
        for sim, peer in ((prefill, decode), (decode, prefill)):
            assert sim.stats()["pd"]["handshakes"] == {"p2p_initialize": 1, "p2p_connect": 1}
            connect = next(r["body"] for r in sim.requests() if r["path"] == "/distserve/p2p_connect")
            assert connect["remote_engine_id"] == peer.url
        # A failed migration may mean a restarted engine without its links: the pair connects again.
        decode.set_faults(error_rate=1.0, error_status=500, count=1)
        assert post(stack, chat("fresh-pair", "after a restart", max_tokens=4)).status_code == 502
        assert post(stack, chat("fresh-pair", "after a restart", max_tokens=4)).status_code == 200
        for sim in (prefill, decode):
            assert sim.stats()["pd"]["handshakes"] == {"p2p_initialize": 2, "p2p_connect": 2}
        wait_kv_settled([prefill])


def test_a_failed_lmdeploy_decode_is_a_502_and_frees_the_cache(pd):
    stack, prefill, decode = pd
    decode.set_faults(error_rate=1.0, error_status=500, count=1)
    response = post(stack, chat(MODEL, max_tokens=4))
    assert response.status_code == 502
    assert wait_kv_settled([prefill])[0]["freed"] == 1


def test_a_failed_lmdeploy_prefill_keeps_its_status(pd):
    stack, prefill, decode = pd
    prefill.set_faults(error_rate=1.0, error_status=500, count=1)
    response = post(stack, chat(MODEL, max_tokens=4))
    assert response.status_code == 500
    assert not inference(decode)


def test_a_client_that_leaves_during_the_lmdeploy_prefill_still_gets_the_cache_freed(pd):
    stack, prefill, decode = pd
    prefill.set_faults(slow_first_token_ms=600, count=1)
    host, port = stack.base.removeprefix("http://").split(":")
    body = json.dumps(chat(MODEL, max_tokens=4)).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {stack.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        prefill.wait_for(lambda s: s["kv"]["allocated"] == 1)
    prefill.wait_for(lambda s: s["kv"]["freed"] == 1)
    assert not inference(decode)
