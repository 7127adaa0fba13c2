"""Shared counters: two workers (two SharedCounters) on one real Redis see each other's load and
share per-key limits; without Redis each keeps serving on its own counts."""

from __future__ import annotations

import time

import pytest
import redis

from nodes.live import keys
from nodes.live import workers as live_workers
from proxy.shared import SharedCounters
from proxy.snapshot import KeyView, NodeView
from tests.support.ports import closed_port
from tests.support.wait import wait_until_async

NODE = NodeView(id=7, url="http://a:1", engine_type="openai", role="hybrid", state="active", health="healthy")
LIMITED = NodeView(
    id=8, url="http://b:1", engine_type="openai", role="hybrid", state="active", health="healthy", max_concurrency=3
)


@pytest.fixture
def workers(redis_url):
    a, b = SharedCounters(redis_url, interval=0.05), SharedCounters(redis_url, interval=0.05)
    yield a, b


async def test_a_worker_sees_the_other_workers_in_flight_requests(workers) -> None:
    a, b = workers
    for _ in range(4):
        assert a.load.try_acquire(NODE)
    await a.sync_once()
    await b.sync_once()
    assert b.load.inflight(NODE.id) == 4
    assert b.load.cluster_counts() == {NODE.id: 4}
    assert b.load.counts() == {}  # its own counts stay its own
    for _ in range(4):
        a.load.release(NODE.id)
    await a.sync_once()
    await b.sync_once()
    assert b.load.inflight(NODE.id) == 0


async def test_a_node_limit_holds_across_workers(workers) -> None:
    a, b = workers
    assert a.load.try_acquire(LIMITED) and a.load.try_acquire(LIMITED)
    await a.sync_once()
    await b.sync_once()
    assert b.load.try_acquire(LIMITED)
    assert not b.load.try_acquire(LIMITED)  # 2 on a + 1 on b = the limit of 3


async def test_key_limits_count_every_workers_requests(workers) -> None:
    a, b = workers
    key = KeyView(id=1, name="k", allowed_models=frozenset(), rate_limit_rpm=5, max_concurrent=None)
    for _ in range(3):
        assert a.limiter.try_acquire(key) is None
    await a.sync_once()
    await b.sync_once()
    assert b.limiter.try_acquire(key) is None
    assert b.limiter.try_acquire(key) is None
    assert b.limiter.try_acquire(key) == "rate_limit_rpm"
    concurrent = KeyView(id=2, name="c", allowed_models=frozenset(), max_concurrent=2)
    assert a.limiter.try_acquire(concurrent) is None
    await a.sync_once()
    await b.sync_once()
    assert b.limiter.try_acquire(concurrent) is None
    assert b.limiter.try_acquire(concurrent) == "max_concurrent"


async def test_without_redis_each_worker_falls_back_to_its_own_counts(workers) -> None:
    a, b = workers
    a.load.try_acquire(NODE)
    await a.sync_once()
    await b.sync_once()
    assert b.load.inflight(NODE.id) == 1
    b.view.stale_after = 0.1
    await wait_until_async(lambda: not b.view.fresh(), 1, "the view never went stale")  # no sync since: dropped
    assert b.load.inflight(NODE.id) == 0
    assert b.load.try_acquire(NODE)
    assert b.load.inflight(NODE.id) == 1


async def test_the_background_task_survives_an_unreachable_redis_and_recovers(redis_url) -> None:
    down = SharedCounters(f"redis://127.0.0.1:{closed_port()}/0", interval=0.05)
    down.start()
    await wait_until_async(lambda: not down._healthy, 5, "it never tried Redis")
    assert down._task is not None and not down._task.done()  # still trying, not crashed
    assert not down.view.fresh()
    await down.stop()
    up = SharedCounters(redis_url, interval=0.05)
    up.start()
    await wait_until_async(up.view.fresh, 5, "it never synced")
    assert up.view.fresh()
    await up.stop()
    assert redis.Redis.from_url(redis_url).zscore("routerpanel:workers", up.worker) is None


async def test_a_worker_that_died_without_saying_goodbye_counts_for_nothing_and_is_forgotten(
    workers, redis_url
) -> None:
    a, b = workers
    a.load.try_acquire(NODE)
    await a.sync_once()
    await b.sync_once()
    assert b.load.inflight(NODE.id) == 1
    client = redis.Redis.from_url(redis_url)
    # ``a`` dies: its counters expire (as their TTL makes them do), then its last turn ages past the horizon.
    client.delete(keys.worker_load_key(a.worker), keys.worker_keys_key(a.worker))
    await b.sync_once()
    assert b.load.inflight(NODE.id) == 0
    assert client.zscore(keys.WORKERS, a.worker) is not None
    client.zadd(keys.WORKERS, {a.worker: time.time() - live_workers.HORIZON - 1})
    await b.sync_once()
    assert client.zscore(keys.WORKERS, a.worker) is None
    assert client.zscore(keys.WORKERS, b.worker) is not None


async def test_key_use_is_recorded_for_the_database_off_the_hot_path(workers, redis_url) -> None:
    a, _ = workers
    a.key_used[5] = 1_700_000_000.5
    await a.sync_once()
    assert redis.Redis.from_url(redis_url).hget("routerpanel:keys-last-used", "5") == b"1700000000.5"
    assert a.key_used == {}


async def test_breaker_transitions_reach_the_other_worker_and_an_unchanged_hash_is_not_read_again(workers) -> None:
    a, b = workers
    for _ in range(a.breakers.threshold):
        a.breakers.failure(NODE.id)
    await a.sync_once()
    await b.sync_once()
    assert b.breakers.state(NODE.id) == "open"
    client = b.client()
    read = client.hgetall
    reads: list[str] = []

    async def counting(key: str):
        reads.append(key)
        return await read(key)

    client.hgetall = counting  # type: ignore[method-assign]
    for _ in range(5):
        await b.sync_once()
    assert "routerpanel:breakers" not in reads  # its version did not move: the hash is not read
