"""Node health as live state on the data path: laid over the snapshot without a rebuild, recomputing
only what changed, at most once per interval, read from Redis only when its version moved; the
panic threshold; a configuration rebuild keeps the live health."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from nodes.live import keys
from nodes.live.health import encode_states, queue_states
from proxy import snapshot as snapshots
from proxy.health import LiveHealth
from proxy.shared import SharedCounters
from proxy.snapshot import PolicyView, with_health
from proxy.watcher import SnapshotWatcher

from .conftest import AUTH, call, make_snapshot

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def urls(targets) -> list[str]:
    return [t.node.url for t in targets]


def test_the_live_state_overrides_the_databases_health_and_only_changed_routes_are_recomputed() -> None:
    snap = make_snapshot(
        [
            {"url": "http://a:1", "models": ["m"]},
            {"url": "http://b:1", "models": ["m"], "health": "unknown"},
            {"url": "http://c:1", "models": ["other"]},
        ]
    )
    assert urls(snap.routes["m"].hybrid) == ["http://a:1"]
    live = with_health(snap, {1: "unhealthy", 2: "healthy"})
    assert urls(live.routes["m"].hybrid) == ["http://b:1"]
    assert live.routes["other"] is snap.routes["other"]  # untouched: the same object
    assert live.version == snap.version  # not a configuration change
    assert with_health(live, {1: "unhealthy", 2: "healthy"}) is live  # nothing changed: nothing recomputed


def test_a_node_the_live_state_does_not_mention_keeps_the_databases_health() -> None:
    snap = make_snapshot([{"url": "http://a:1"}, {"url": "http://b:1"}])
    assert urls(with_health(snap, {2: "unhealthy"}).routes["m"].hybrid) == ["http://a:1"]


@pytest.mark.parametrize(
    ("threshold", "healthy", "sick", "in_rotation", "panic"),
    [
        (0.5, 2, 2, 2, ()),  # half pass: route to the healthy half
        (0.5, 1, 2, 3, ("hybrid",)),  # a third pass: route to all three
        (0.5, 0, 2, 2, ("hybrid",)),  # none pass: all rather than none
        (0.0, 0, 2, 0, ()),  # turned off: none
        (1.0, 3, 1, 4, ("hybrid",)),  # any failure: all
    ],
)
def test_below_the_panic_threshold_a_model_routes_to_all_its_probed_nodes(
    threshold, healthy, sick, in_rotation, panic
) -> None:
    nodes = [{"url": f"http://h{i}:1"} for i in range(healthy)]
    nodes += [{"url": f"http://s{i}:1", "health": "unhealthy"} for i in range(sick)]
    nodes += [{"url": "http://new:1", "health": "unknown"}, {"url": "http://off:1", "state": "disabled"}]
    route = make_snapshot(nodes, default_policy=PolicyView(panic_threshold=threshold)).routes["m"]
    assert len(route.hybrid) == in_rotation
    assert route.panic == panic
    assert "http://new:1" not in urls(route.hybrid)  # never probed: never routed to, panic or not


def test_a_sick_prefill_node_does_not_turn_an_auto_model_away_from_its_healthy_hybrid_node() -> None:
    route = make_snapshot(
        [
            {"url": "http://h:1"},
            {"url": "http://p:1", "role": "prefill", "health": "unhealthy"},
            {"url": "http://d:1", "role": "decode"},
        ]
    ).routes["m"]
    assert (route.mode, route.panic, urls(route.prefill)) == ("hybrid", (), [])


async def test_readiness_reports_a_model_routing_in_panic(proxy_app) -> None:
    snapshots.install(
        make_snapshot([{"url": "http://a:1", "health": "unhealthy"}, {"url": "http://b:1", "health": "unhealthy"}])
    )
    response = await call(proxy_app, "GET", "/health/ready")
    assert response.status == 503
    model = response.json()["models"]["m"]
    assert (model["panic"], model["reasons"]) == ({"hybrid": 2}, ["no healthy hybrid node"])


class CountingRedis:
    """Enough of ``redis.asyncio.Redis`` for ``LiveHealth``: the states, and how often they were read."""

    def __init__(self, states: dict[int, str]) -> None:
        self.states = states
        self.reads = 0

    async def get(self, key: str) -> str:
        assert key == keys.HEALTH_STATES
        self.reads += 1
        return encode_states(self.states)


async def test_the_worker_reads_the_states_only_when_their_version_moved() -> None:
    client = CountingRedis({1: "unhealthy"})
    health = LiveHealth()
    assert await health.refresh(client, b"4")  # type: ignore[arg-type]
    for _ in range(50):  # fifty ticks of the loop with nothing new: no read
        assert not await health.refresh(client, b"4")  # type: ignore[arg-type]
    assert await health.refresh(client, b"5")  # type: ignore[arg-type]
    assert client.reads == 2
    assert health.states == {1: "unhealthy"}
    assert await health.refresh(client, None)  # a Redis that lost the key (restarted): read once
    assert not await health.refresh(client, None)
    assert client.reads == 3


async def test_under_churn_the_routes_are_recomputed_at_most_once_per_interval() -> None:
    previous = snapshots.current()
    clock = [100.0]
    health = LiveHealth(apply_interval=1.0, clock=lambda: clock[0])
    client = CountingRedis({})
    snapshots.install(make_snapshot([{"url": "http://a:1"}, {"url": "http://b:1"}]))
    try:
        applied = 0
        for tick in range(30):  # 3 s of a transition on every 100 ms tick
            client.states = {1: "unhealthy" if tick % 2 else "healthy"}
            await health.refresh(client, str(tick).encode())  # type: ignore[arg-type]
            applied += await health.apply_due()
            clock[0] += 0.1
        assert applied == 3
        assert health.pending  # the last states wait for the next interval, they are not lost
        clock[0] += 1.0
        assert await health.apply_due()
        assert urls(snapshots.current().routes["m"].hybrid) == ["http://b:1"]  # the last states: node 1 sick
    finally:
        snapshots.install(previous)


@pytest.mark.django_db(transaction=True)
async def test_a_configuration_rebuild_keeps_the_live_health(settings) -> None:
    from asgiref.sync import sync_to_async

    from nodes.services import Actor, node_create

    previous = snapshots.current()
    actor = Actor.system("test")
    await sync_to_async(node_create)(actor=actor, url="http://a:1", models=["m"], health="healthy")
    await sync_to_async(node_create)(actor=actor, url="http://b:1", models=["m"], health="healthy")
    health = LiveHealth()
    watcher = SnapshotWatcher(overlay=health.overlay)
    try:
        await watcher.refresh("start-up")
        a_id = next(t.node.id for t in snapshots.current().routes["m"].targets if t.node.url == "http://a:1")
        health.states = {a_id: "unhealthy"}
        health.pending = True
        assert await health.apply_due(force=True)
        assert urls(snapshots.current().routes["m"].hybrid) == ["http://b:1"]
        await watcher.refresh("configuration changed")  # the database still says healthy
        assert urls(snapshots.current().routes["m"].hybrid) == ["http://b:1"]
    finally:
        await watcher.stop()
        snapshots.install(previous)


async def test_a_transition_published_in_redis_reaches_routing_without_a_rebuild(engines, proxy_app, redis_url):
    """The prober's write (states hash + version) is all it takes: the worker's loop reads it and
    the next request routes around the node; no configuration version, no database."""
    a, b = await engines("a"), await engines("b")
    snapshots.install(make_snapshot([{"url": a.url}, {"url": b.url}], version=7))
    shared = SharedCounters(redis_url, interval=0.02, share_counters=False, health=LiveHealth(apply_interval=0.0))
    shared.start()
    try:
        client = redis.Redis.from_url(redis_url)
        with client.pipeline(transaction=True) as pipe:
            queue_states(pipe, {1: "unhealthy", 2: "healthy"})
            pipe.execute()
        deadline = time.monotonic() + 2
        while urls(snapshots.current().routes["m"].hybrid) != [b.url]:
            assert time.monotonic() < deadline, "the live state never reached the routes"
            await asyncio.sleep(0.01)
        for _ in range(4):
            assert (await call(proxy_app, "POST", CHAT, json_body=BODY, headers=AUTH)).status == 200
        assert (len(a.received), len(b.received)) == (0, 4)
        assert snapshots.current().version == 7
    finally:
        await shared.stop()


async def test_a_redis_that_lost_its_data_does_not_make_a_worker_forget_the_health_it_saw() -> None:
    client = CountingRedis({1: "unhealthy", 2: "healthy"})
    health = LiveHealth()
    await health.refresh(client, b"9")  # type: ignore[arg-type]
    client.states = {}  # Redis restarted without persistence: no states, no version
    assert await health.refresh(client, None)  # type: ignore[arg-type]
    assert health.states == {1: "unhealthy", 2: "healthy"}
    client.states = {1: "healthy"}  # the prober (or a registration) writes again
    await health.refresh(client, b"1")  # type: ignore[arg-type]
    assert health.states == {1: "healthy", 2: "healthy"}
