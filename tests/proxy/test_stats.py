"""Live per-node statistics: counting on the hot path, publishing to Redis, merging across workers."""

from __future__ import annotations

import json
import time

import pytest
import redis as redis_lib
import redis.asyncio as aioredis

from nodes.live import keys
from nodes.live import stats as live_stats
from nodes.live.stats import merge_snapshots
from proxy import stats
from proxy.shared import SharedCounters
from proxy.stats import NodeStats, is_failure
from tests.support.ports import closed_port
from tests.support.wait import wait_until_async

from .pd_fakes import fake_pd

REDIS_DOWN = f"redis://127.0.0.1:{closed_port()}/0"  # refuses connections

__all__ = ["fake_pd"]


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("status", "elapsed", "client_gone", "failed"),
    [
        (200, 0.1, False, False),
        (404, 0.1, False, False),
        (500, 0.1, False, True),
        (0, None, False, True),  # connect error or timeout before any answer
        (503, None, False, True),  # retried elsewhere
        (429, None, False, False),  # busy: try elsewhere, not sick
        (200, None, False, True),  # the answer broke off
        (0, None, True, False),  # the client left
    ],
)
def test_it_counts_only_connect_errors_timeouts_and_5xx_as_failures(status, elapsed, client_gone, failed) -> None:
    assert is_failure(status, elapsed, client_gone) is failed


def test_it_counts_attempts_errors_and_samples_per_node() -> None:
    clock = Clock()
    node_stats = NodeStats(clock=clock)
    node_stats.record(1, status=200, elapsed=0.2, ttft=0.05)
    node_stats.record(1, status=502, elapsed=None)
    node_stats.record(2, status=200, elapsed=0.4)

    snapshot = node_stats.snapshot({1: 3})

    assert snapshot["1"]["requests"] == 2
    assert snapshot["1"]["errors"] == 1
    assert snapshot["1"]["inflight"] == 3
    assert (snapshot["1"]["first"], snapshot["1"]["counts"], snapshot["1"]["failures"]) == (int(clock.now), [2], [1])
    assert snapshot["1"]["latency_us"] == [200_000]
    assert snapshot["1"]["ttft_us"] == [50_000]
    assert snapshot["2"]["inflight"] == 0


def test_a_node_with_requests_in_flight_but_none_finished_is_listed() -> None:
    assert NodeStats().snapshot({7: 2})["7"] == {
        "inflight": 2,
        "requests": 0,
        "errors": 0,
        "first": 0,
        "counts": [],
        "failures": [],
        "latency_us": [],
        "ttft_us": [],
    }


def test_its_memory_is_bounded() -> None:
    clock = Clock()
    node_stats = NodeStats(clock=clock)
    for _ in range(live_stats.HISTORY_SECONDS + 50):
        for _ in range(3):
            node_stats.record(1, status=200, elapsed=0.01, ttft=0.001)
        clock.now += 1
    snapshot = node_stats.snapshot()["1"]
    assert len(snapshot["counts"]) == len(snapshot["failures"]) <= live_stats.HISTORY_SECONDS + 1
    assert len(node_stats._nodes[1].latency) == stats.SAMPLES
    assert len(snapshot["latency_us"]) == stats.SAMPLES


def test_a_publish_stays_small_with_a_thousand_busy_nodes() -> None:
    """Each node that took a request every second for the whole history, with full samples: the
    publish (once a second, on the worker's event loop) stays about a megabyte. Float pairs and
    string-keyed buckets made it 19 MB, 1.5 s to encode."""
    clock = Clock()
    node_stats = NodeStats(clock=clock)
    for _ in range(live_stats.HISTORY_SECONDS):
        clock.now += 1
        for node_id in range(1000):
            node_stats.record(node_id, status=200, elapsed=0.123456789, ttft=0.0123456789)
    payload = SharedCounters(REDIS_DOWN, stats=node_stats, worker="w").stats_payload()
    assert len(payload) < 1_600_000
    figures = merge_snapshots([json.loads(payload)], now=clock.now + 0.5)
    assert len(figures) == 1000
    assert figures[999]["p50_latency"] == pytest.approx(0.123457)
    assert figures[999]["rps"] == 1.0
    assert figures[999]["history"][-1] == 1


def test_a_node_idle_for_the_whole_history_is_forgotten() -> None:
    clock = Clock()
    node_stats = NodeStats(clock=clock)
    node_stats.record(1, status=200, elapsed=0.01)
    node_stats.record(2, status=200, elapsed=0.01)
    clock.now += live_stats.HISTORY_SECONDS + 2
    node_stats.record(2, status=200, elapsed=0.01)
    assert set(node_stats.snapshot({3: 1})) == {"2", "3"}
    assert set(node_stats._nodes) == {2}


def test_recording_costs_a_few_microseconds() -> None:
    node_stats = NodeStats()
    count = 20_000
    started = time.perf_counter()
    for i in range(count):
        node_stats.record(i % 8, status=200, elapsed=0.01, ttft=0.002)
    per_call = (time.perf_counter() - started) / count
    assert per_call < 20e-6, f"{per_call * 1e6:.1f} µs per record"


def _worker(nodes: dict, at: float) -> dict:
    return {"worker": "w", "at": at, "nodes": nodes}


def test_it_merges_workers_into_rates_error_rates_and_medians() -> None:
    now = 2_000_000.5
    second = int(now)
    a = {
        "3": {
            "inflight": 2,
            "requests": 100,
            "errors": 4,
            "first": second - 2,
            "counts": [10, 10, 50],
            "failures": [1, 1, 0],
            "latency_us": [100_000, 300_000],
            "ttft_us": [10_000],
        }
    }
    # A worker of the previous release (during a rolling upgrade) published samples with their times
    # and string-keyed buckets: merged the same way.
    b = {
        "3": {
            "inflight": 1,
            "requests": 50,
            "errors": 0,
            "buckets": {str(second - 1): [5, 0], str(second - 600): [99, 99]},
            "latency": [[now - 1, 0.2], [now - 3600, 9.0]],  # the old sample is ignored
            "ttft": [],
        }
    }

    figures = merge_snapshots([_worker(a, now), _worker(b, now)], now=now)[3]

    assert figures["inflight"] == 3
    assert figures["requests"] == 150
    assert figures["errors"] == 4
    assert figures["rps"] == pytest.approx(25 / live_stats.RATE_WINDOW)  # the current second is left out
    assert figures["error_rate"] == pytest.approx(2 / 25)
    assert figures["p50_latency"] == pytest.approx(0.2)
    assert figures["p50_ttft"] == pytest.approx(0.01)
    assert len(figures["history"]) == live_stats.HISTORY_SECONDS
    assert figures["history"][-2:] == [10, 15]


def test_an_idle_node_has_no_rates_to_show() -> None:
    figures = merge_snapshots([_worker({"1": NodeStats().snapshot({1: 0})["1"]}, 0.0)], now=10.0)[1]
    assert figures["rps"] == 0
    assert figures["error_rate"] is None
    assert figures["p50_latency"] is None


async def test_the_publisher_shares_this_workers_numbers_through_redis(redis_url: str) -> None:
    node_stats = NodeStats()
    node_stats.record(5, status=200, elapsed=0.25)
    publisher = SharedCounters(
        redis_url,
        share_counters=False,
        stats=node_stats,
        inflight=lambda: {5: 4},
        interval=0.05,
        stats_interval=0.05,
        worker="test-worker",
    )
    publisher.start()
    try:
        await wait_until_async(lambda: publisher.published >= 2, 10, "the publisher never wrote to Redis")
        client = aioredis.Redis.from_url(redis_url)
        try:
            fleet = await live_stats.read_fleet_stats(client)
            ttl = await client.ttl(keys.stats_worker_key("test-worker"))
        finally:
            await client.aclose()
    finally:
        await publisher.stop()
    assert fleet is not None
    assert fleet[5]["inflight"] == 4
    assert fleet[5]["requests"] == 1
    assert fleet[5]["p50_latency"] == pytest.approx(0.25)
    assert 0 < ttl <= live_stats.SNAPSHOT_TTL
    # A stopped worker removes its snapshot at once.
    assert redis_lib.Redis.from_url(redis_url).get(keys.stats_worker_key("test-worker")) is None


async def test_the_publisher_keeps_going_while_redis_is_down() -> None:
    publisher = SharedCounters(
        REDIS_DOWN,
        share_counters=False,
        stats=NodeStats(),
        interval=0.01,
        stats_interval=0.01,
        worker="down",
    )
    publisher.start()
    await wait_until_async(lambda: not publisher._healthy, 5, "the publisher never tried Redis")
    assert publisher._task is not None and not publisher._task.done()
    assert publisher.published == 0
    await publisher.stop()


async def test_reading_while_redis_is_down_gives_none() -> None:
    client = aioredis.Redis.from_url(REDIS_DOWN, socket_connect_timeout=0.2)
    try:
        assert await live_stats.read_fleet_stats(client) is None
    finally:
        await client.aclose()


def test_the_payload_is_json_a_dashboard_can_read() -> None:
    node_stats = NodeStats()
    node_stats.record(1, status=200, elapsed=0.1)
    payload = json.loads(SharedCounters(REDIS_DOWN, stats=node_stats, worker="w1").stats_payload())
    assert payload["worker"] == "w1"
    assert payload["nodes"]["1"]["requests"] == 1


async def test_the_proxy_counts_each_attempt_against_the_node_that_served_it(engines, proxy_app) -> None:
    from proxy import snapshot as snapshots

    from .conftest import AUTH, call, make_snapshot

    dead_url = f"http://127.0.0.1:{closed_port()}"  # refuses connections
    good = await engines("good")
    snapshots.install(make_snapshot([{"url": dead_url}, {"url": good.url}]))  # node ids 1 and 2
    stats.STATS.clear()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for stream in (False, True, False, True):
        response = await call(
            proxy_app, "POST", "/v1/chat/completions", json_body={**body, "stream": stream}, headers=AUTH
        )
        assert response.status == 200

    figures = stats.STATS.snapshot()
    assert figures["2"]["requests"] == 4
    assert figures["2"]["errors"] == 0
    assert len(figures["2"]["latency_us"]) == 4
    assert len(figures["2"]["ttft_us"]) == 2  # streams only
    assert figures["1"]["requests"] == figures["1"]["errors"] >= 1  # round robin tried the dead node first


async def test_a_pd_request_counts_its_prefill_and_decode_legs_once_each(fake_pd, proxy_app) -> None:
    from proxy import snapshot as snapshots
    from proxy.snapshot import PolicyView

    from .conftest import AUTH, call, make_snapshot
    from .pd_fakes import CHAT, pd_nodes, settled

    engines, prefills, decodes = await fake_pd()
    policy = PolicyView(serving_mode="pd", first_token_timeout=5.0, total_timeout=10.0)
    snapshots.install(make_snapshot(pd_nodes(prefills, decodes), default_policy=policy))
    stats.STATS.clear()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    for stream in (False, True):
        response = await call(proxy_app, "POST", CHAT, json_body={**body, "stream": stream}, headers=AUTH)
        assert response.status == 200, response.body
    await settled(proxy_app)
    assert engines.held == set()

    figures = stats.STATS.snapshot()
    assert sorted((f["requests"], f["errors"]) for f in figures.values()) == [(2, 0), (2, 0)]
    assert sum(len(f["ttft_us"]) for f in figures.values()) == 1  # the decode leg of the stream
