"""PD retries before any byte reached the client, and the answers when they run out: a dead or
overloaded prefill is retried on another prefill node, a dead or overloaded decode on another
decode node (the KV is still held for it), and the prefill's KV is freed exactly once either way."""

from __future__ import annotations

from proxy import snapshot as snapshots
from proxy.pd import metrics as pd_metrics
from proxy.snapshot import PolicyView
from tests.support.ports import closed_port

from .conftest import AUTH, call, make_snapshot
from .pd_fakes import CHAT, fake_pd, pd_nodes, settled

__all__ = ["fake_pd"]

DEAD = f"http://127.0.0.1:{closed_port()}"  # refuses connections
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def install(prefills, decodes, **policy) -> None:
    options = {"serving_mode": "pd", "retry_budget": 2, "first_token_timeout": 5.0, "total_timeout": 10.0, **policy}
    snapshots.install(make_snapshot(pd_nodes(prefills, decodes), default_policy=PolicyView(**options)))


def assert_no_leak(engines) -> None:
    assert engines.held == set() and engines.freed == engines.allocated and engines.double_frees == 0


async def test_a_dead_prefill_node_is_retried_on_another(fake_pd, proxy_app):
    engines, prefills, decodes = await fake_pd()
    install([DEAD, *prefills], decodes)
    for _ in range(2):  # round robin starts on either prefill: one of the two requests meets the dead one
        response = await call(proxy_app, "POST", CHAT, json_body=BODY, headers=AUTH)
        assert response.status == 200, response.body
        assert response.headers["x-routerpanel-node"] == f"prefill={prefills[0]}; decode={decodes[0]}"
    await settled(proxy_app)
    assert engines.allocated == 2
    assert_no_leak(engines)


async def test_an_overloaded_prefill_is_retried_and_a_failing_one_is_the_answer(fake_pd, proxy_app):
    engines, prefills, decodes = await fake_pd(prefills=2)
    install(prefills, decodes)
    engines.fail(prefills[0], 503)
    engines.fail(prefills[1], 503)
    response = await call(proxy_app, "POST", CHAT, json_body=BODY, headers=AUTH)
    assert response.status == 503  # budget spent: the engine's own answer, status and message intact
    assert response.json()["error"]["message"] == "fake 503"
    engines.fail(prefills[0], 500)
    engines.fail(prefills[1], 500)
    first = await call(proxy_app, "POST", CHAT, json_body=BODY, headers=AUTH)
    assert first.status == 500  # not an overload: no retry, no recompute on the decode
    assert engines.decodes == 0
    await settled(proxy_app)
    assert engines.allocated == 0
    assert_no_leak(engines)


async def test_an_overloaded_or_dead_decode_is_retried_with_the_same_migration(fake_pd, proxy_app):
    engines, prefills, decodes = await fake_pd(decodes=2)
    install(prefills, [DEAD, *decodes])
    engines.fail(decodes[0], 503)
    for _ in range(3):
        response = await call(proxy_app, "POST", CHAT, json_body=BODY, headers=AUTH)
        assert response.status == 200, response.body
    await settled(proxy_app)
    assert engines.decodes == 3 and engines.allocated == 3
    assert_no_leak(engines)


async def test_a_decode_that_keeps_failing_is_a_502_and_the_kv_is_freed_once(fake_pd, proxy_app):
    engines, prefills, decodes = await fake_pd()
    install(prefills, decodes, retry_budget=1)
    engines.fail(decodes[0], 500)
    response = await call(proxy_app, "POST", CHAT, json_body=BODY, headers=AUTH)
    assert response.status == 502
    assert response.json()["error"]["code"] == "decode_failed"
    assert "fake 500" in response.json()["error"]["message"]
    await settled(proxy_app)
    assert engines.allocated == 1
    assert_no_leak(engines)


async def test_usage_has_the_prefills_prompt_tokens(fake_pd, proxy_app):
    engines, prefills, decodes = await fake_pd()
    install(prefills, decodes)
    response = await call(proxy_app, "POST", CHAT, json_body=BODY, headers=AUTH)
    assert response.json()["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}
    await settled(proxy_app)
    assert_no_leak(engines)


async def test_failing_legs_open_the_nodes_circuit_breaker(fake_pd, proxy_app):
    engines, prefills, decodes = await fake_pd()
    install(prefills, decodes, retry_budget=0)
    threshold = proxy_app.router.breakers.threshold
    engines.fail(prefills[0], *[500] * threshold)
    for _ in range(threshold):
        assert (await call(proxy_app, "POST", CHAT, json_body=BODY, headers=AUTH)).status == 500
    response = await call(proxy_app, "POST", CHAT, json_body=BODY, headers=AUTH)
    assert response.status == 503
    assert response.json()["error"]["code"] == "no_prefill_capacity"
    await settled(proxy_app)
    assert_no_leak(engines)


def leg_errors() -> dict[tuple[str, str], float]:
    return {
        (sample.labels["leg"], sample.labels["kind"]): sample.value
        for metric in pd_metrics.LEG_ERRORS.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


async def test_each_failed_leg_counts_once_by_leg_and_kind(fake_pd, proxy_app):
    engines, prefills, decodes = await fake_pd()
    install(prefills, decodes, retry_budget=1)
    before = leg_errors()

    def added() -> dict[tuple[str, str], float]:
        return {key: value - before.get(key, 0) for key, value in leg_errors().items() if value != before.get(key, 0)}

    engines.fail(prefills[0], 500)
    assert (await call(proxy_app, "POST", CHAT, json_body=BODY, headers=AUTH)).status == 500
    assert added() == {("prefill", "engine_500"): 1}
    engines.fail(decodes[0], 500)  # one decode node: nothing else to try
    assert (await call(proxy_app, "POST", CHAT, json_body=BODY, headers=AUTH)).status == 502
    assert added() == {("prefill", "engine_500"): 1, ("decode", "decode_failed"): 1}
    install([DEAD], decodes, retry_budget=0)
    assert (await call(proxy_app, "POST", CHAT, json_body=BODY, headers=AUTH)).status == 502
    unreachable = ("prefill", "prefill_unreachable")
    assert added() == {("prefill", "engine_500"): 1, ("decode", "decode_failed"): 1, unreachable: 1}
    await settled(proxy_app)
    assert_no_leak(engines)
