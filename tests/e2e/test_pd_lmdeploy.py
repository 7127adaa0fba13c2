"""LMDeploy PD by migration through real processes, against simulated LMDeploy 0.18 engines as strict
as the real ones: the p2p link made once per pair as LMDeploy's proxy makes it, a one-token prefill
that preserves its cache, a decode with a ``migration_request`` whose engine frees the prefill's
session itself, and ``free_cache`` only for a decode that did not finish (docs/pd.md, "LMDeploy")."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from enginesim.testing import Simulator, run_simulator
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

pytestmark = pytest.mark.e2e

MODEL = "lmdeploy-model"
NAMED = "lmdeploy-named"  # engines that name the prefill's session in ``cache_session_id``


def engine_pair(model: str, *extra: str) -> Iterator[tuple[Simulator, Simulator]]:
    common = {"engine": "lmdeploy", "served_model_name": model, "model_path": f"/models/{model}"}
    with (
        run_simulator(role="prefill", extra_args=list(extra), **common) as prefill,
        run_simulator(role="decode", extra_args=list(extra), **common) as decode,
    ):
        yield prefill, decode


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[Simulator, Simulator]]:
    """LMDeploy 0.18 as released: no answer field names the prefill's session."""
    yield from engine_pair(MODEL)


@pytest.fixture(scope="module")
def named_engines() -> Iterator[tuple[Simulator, Simulator]]:
    yield from engine_pair(NAMED, "--cache-session-id")


def register(stack, prefill: Simulator, decode: Simulator, model: str) -> None:
    prefill.reset()
    decode.reset()
    stack.add_node(prefill.url, [model], role="prefill", engine_type="lmdeploy", settle=False)
    stack.add_node(decode.url, [model], role="decode", engine_type="lmdeploy", settle=False)
    stack.set_policy(
        model, serving_mode="pd", retry_budget=0, first_token_timeout=3.0, total_timeout=10.0, settle=False
    )
    stack.settle()


@pytest.fixture
def pd(stack, engines):
    prefill, decode = engines
    register(stack, prefill, decode, MODEL)
    yield stack, prefill, decode
    assert wait_router_idle(stack) == {"node_inflight": 0, "pd_inflight": 0, "pd_cleanups_pending": 0}
    ledger = prefill.stats()["kv"]
    assert ledger["double_free"] == 0 and ledger["unknown_free"] == 0
    prefill.reset()  # the sessions LMDeploy 0.18 leaks by design (asserted by the tests)


@pytest.fixture
def named(stack, named_engines):
    prefill, decode = named_engines
    register(stack, prefill, decode, NAMED)
    yield stack, prefill, decode
    ledger = wait_kv_settled([prefill])[0]
    assert ledger["freed"] == ledger["allocated"] and ledger["double_free"] == 0 and ledger["unknown_free"] == 0
    assert wait_router_idle(stack) == {"node_inflight": 0, "pd_inflight": 0, "pd_cleanups_pending": 0}


def inference(sim) -> list[dict]:
    return [r for r in sim.requests() if r["path"].startswith("/v1/")]


def bodies(sim, path: str) -> list[dict]:
    return [r["body"] for r in sim.requests() if r["path"] == path]


def unreleasable(stack) -> float:
    return sum(metric_values(stack, "routerpanel_proxy_pd_kv_unreleasable_total").values())


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_lmdeploy_pd_migrates_the_prefill_cache(pd, make, stream):
    stack, prefill, decode = pd
    before = unreleasable(stack)
    body = make(MODEL, max_tokens=10, max_completion_tokens=10, **({"stream": True} if stream else {}))
    response = post(stack, body)
    assert response.status_code == 200, response.text
    text = streamed_text(events(response.text)) if stream else answer_text(response.json())
    assert text == expected_text(body)
    copy = inference(prefill)[-1]["body"]
    assert copy["max_tokens"] == 1 and copy["max_completion_tokens"] == 1 and copy["stream"] is False
    assert copy["with_cache"] is True and copy["preserve_cache"] is True
    sent = inference(decode)[-1]["body"]
    assert "with_cache" not in sent and "preserve_cache" not in sent
    assert sent["migration_request"] == {
        "protocol": 2,  # MigrationProtocol.RDMA, by value
        "remote_engine_id": prefill.url,
        "remote_session_id": -1,  # LMDeploy 0.18 names the session in no answer field
        "remote_block_ids": sent["migration_request"]["remote_block_ids"],
        "remote_token_id": sent["migration_request"]["remote_token_id"],
        "is_dummy_prefill": False,
    }
    assert decode.stats()["pd"]["migrations_in"] == 1
    # The decode's release names no session, so the preserved cache stays on the prefill engine:
    # LMDeploy's own leak, which RouterPanel cannot mend and counts; it sends no free_cache.
    assert prefill.stats()["kv"]["outstanding_count"] == 1
    assert not bodies(prefill, "/distserve/free_cache")
    assert unreleasable(stack) == before + 1


def test_with_a_named_session_the_decode_frees_the_prefill_and_routerpanel_sends_no_free(named):
    stack, prefill, decode = named
    response = post(stack, chat(NAMED, max_tokens=6))
    assert response.status_code == 200, response.text
    assert answer_text(response.json()) == expected_text(chat(NAMED, max_tokens=6))
    migration = inference(decode)[-1]["body"]["migration_request"]
    assert migration["remote_session_id"] >= 0
    assert prefill.stats()["pd"]["zmq_frees"] == 1  # released by the decode engine after its read
    assert not bodies(prefill, "/distserve/free_cache")


def test_a_failed_lmdeploy_decode_is_a_502_and_routerpanel_frees_the_cache(named):
    stack, prefill, decode = named
    decode.set_faults(error_rate=1.0, error_status=500, count=1)
    response = post(stack, chat(NAMED, max_tokens=4))
    assert response.status_code == 502
    assert wait_kv_settled([prefill])[0]["freed"] == 1
    (free,) = bodies(prefill, "/distserve/free_cache")
    assert set(free) == {"remote_engine_id", "remote_session_id"} and free["remote_engine_id"] == prefill.url
    assert isinstance(free["remote_session_id"], int) and free["remote_session_id"] >= 0


def test_a_client_that_leaves_during_the_lmdeploy_prefill_still_gets_the_cache_freed(named):
    stack, prefill, decode = named
    prefill.set_faults(slow_first_token_ms=600, count=1)
    host, port = stack.base.removeprefix("http://").split(":")
    body = json.dumps(chat(NAMED, max_tokens=4)).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {stack.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        prefill.wait_for(lambda s: s["kv"]["allocated"] == 1)
    prefill.wait_for(lambda s: s["kv"]["freed"] == 1)
    assert not inference(decode)
    assert len(bodies(prefill, "/distserve/free_cache")) == 1


def test_a_failed_lmdeploy_prefill_keeps_its_status(pd):
    stack, prefill, decode = pd
    prefill.set_faults(error_rate=1.0, error_status=500, count=1)
    response = post(stack, chat(MODEL, max_tokens=4))
    assert response.status_code == 500
    assert not inference(decode)


def test_chat_with_n_above_one_is_refused_before_any_engine_is_asked(pd):
    stack, prefill, decode = pd
    response = post(stack, chat(MODEL, max_tokens=4, n=2))
    assert response.status_code == 400 and response.json()["error"]["code"] == "pd_n_unsupported"
    assert not inference(prefill) and not inference(decode)


def test_the_pair_is_linked_once_as_lmdeploys_proxy_does_and_again_after_a_restart(stack):
    with (
        run_simulator(
            engine="lmdeploy", role="prefill", served_model_name="fresh-pair", extra_args=["--cache-session-id"]
        ) as prefill,
        run_simulator(
            engine="lmdeploy", role="decode", served_model_name="fresh-pair", extra_args=["--cache-session-id"]
        ) as decode,
    ):
        stack.add_live_node(prefill.url, ["fresh-pair"], role="prefill", engine_type="lmdeploy")
        stack.add_live_node(decode.url, ["fresh-pair"], role="decode", engine_type="lmdeploy")
        for i in range(3):
            assert post(stack, chat("fresh-pair", f"handshake {i}", max_tokens=4)).status_code == 200
        infos = {}
        for sim in (prefill, decode):
            assert sim.stats()["pd"]["handshakes"] == {"p2p_initialize": 1, "p2p_connect": 1}
            assert sim.stats()["pd"]["engine_info"] == 1
            infos[sim.url] = json.loads(httpx.get(sim.url + "/distserve/engine_info", timeout=5).json())
        for sim, peer in ((prefill, decode), (decode, prefill)):
            (init,) = bodies(sim, "/distserve/p2p_initialize")
            assert init == {
                "local_engine_id": sim.url,
                "local_engine_config": infos[sim.url],
                "remote_engine_id": peer.url,
                "remote_engine_config": infos[peer.url],
                "protocol": 2,
                "rdma_config": {"with_gdr": True, "link_type": 2},
            }
            (connect,) = bodies(sim, "/distserve/p2p_connect")
            assert connect["protocol"] == 2 and connect["remote_engine_id"] == peer.url
            assert set(connect) == {
                "protocol",
                "remote_engine_id",
                "remote_engine_endpoint_info",
                "remote_kvtransfer_endpoint_info",
            }
        # A restarted decode has lost its links: its migration fails, and the pair is linked again.
        httpx.post(decode.url + "/sim/lmdeploy/drop_links", timeout=5)
        assert post(stack, chat("fresh-pair", "after a restart", max_tokens=4)).status_code == 502
        assert post(stack, chat("fresh-pair", "after a restart", max_tokens=4)).status_code == 200
        for sim in (prefill, decode):
            assert sim.stats()["pd"]["handshakes"] == {"p2p_initialize": 2, "p2p_connect": 2}
        ledger = wait_kv_settled([prefill])[0]
        assert ledger["double_free"] == 0 and ledger["unknown_free"] == 0
