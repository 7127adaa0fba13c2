"""Building the routing snapshot from the registry, and keeping it current."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from asgiref.sync import sync_to_async

from nodes.choices import NodeState
from nodes.models import RoutePolicy
from nodes.services import Actor, alias_create, api_key_create, node_create, node_update, policy_create, policy_update
from proxy import snapshot as snapshots
from proxy.router import Router
from proxy.snapshot import build_routes, build_snapshot
from proxy.watcher import SnapshotWatcher
from tests.support.wait import wait_until_async

from .conftest import make_snapshot

ACTOR = Actor.system("test")


@pytest.mark.django_db
def test_it_builds_routes_keys_and_policies_from_the_registry():
    a = node_create(
        actor=ACTOR, url="http://a:1", models=["llama"], model_path="/models/meta/Llama-3", health="healthy"
    )
    node_create(actor=ACTOR, url="http://b:1", models=["llama"], state=NodeState.DRAINING, health="healthy")
    node_create(actor=ACTOR, url="http://c:1", models=["qwen"], role="prefill")
    alias_create(actor=ACTOR, name="best", served_name="llama")
    policy_create(actor=ACTOR, model="llama", strategy="least_requests", retry_budget=5)
    key, plaintext = api_key_create(actor=ACTOR, name="k", allowed_models=["llama"])

    snap = build_snapshot()

    assert snap.version >= 1
    llama = snap.routes["llama"]
    assert [t.node.url for t in llama.targets] == ["http://a:1", "http://b:1"]
    assert [t.node.url for t in llama.hybrid] == ["http://a:1"]
    assert llama.policy.strategy == "least_requests" and llama.policy.retry_budget == 5
    for name in ("/models/meta/Llama-3", "Llama-3", "best"):
        assert snap.routes[name].policy.strategy == "least_requests"
        assert {t.served_name for t in snap.routes[name].targets} == {"llama"}
    assert snap.routes["best"].targets[0].node.id == a.id
    assert "qwen" in snap.routes and "qwen" not in snap.models  # prefill only: not servable alone
    assert "llama" in snap.models and "best" in snap.models
    from nodes.models import hash_api_key

    view = snap.keys[hash_api_key(plaintext)]
    assert view.id == key.id and view.allows(llama) and not view.allows(snap.routes["qwen"])


def test_a_nodes_own_alias_wins_over_a_global_one_and_global_aliases_reach_every_server():
    nodes = make_snapshot([{"url": "http://a"}, {"url": "http://b"}]).nodes
    rows = [(1, "m", "m"), (2, "m", "m"), (1, "x", "m"), (None, "x", "other"), (None, "y", "m")]
    routes = build_routes(nodes, rows, {}, snapshots.PolicyView())
    assert {t.node.url: t.served_name for t in routes["y"].targets} == {"http://a": "m", "http://b": "m"}
    assert {t.node.url: t.served_name for t in routes["x"].targets} == {"http://a": "m"}


@pytest.mark.django_db
def test_disabled_policies_fall_back_to_the_default():
    node_create(actor=ACTOR, url="http://a:1", models=["m"])
    policy_create(actor=ACTOR, model="m", strategy="power_of_two", enabled=False)
    assert build_snapshot().routes["m"].policy.strategy == "round_robin"


@pytest.fixture
async def watcher(settings):
    settings.ROUTERPANEL_PROXY_VERSION_POLL_INTERVAL = 0.05
    settings.ROUTERPANEL_PROXY_DB_POLL_INTERVAL = 0.5
    previous = snapshots.current()
    watcher = SnapshotWatcher()
    yield watcher
    await watcher.stop()
    snapshots.install(previous)


@pytest.mark.django_db(transaction=True)
async def test_the_watcher_sees_a_change_within_a_second_through_redis(watcher, redis_url):
    await sync_to_async(node_create)(actor=ACTOR, url="http://a:1", models=["m"])
    await watcher.start()
    assert snapshots.current().routes["m"].policy.strategy == "round_robin"
    policy = await sync_to_async(RoutePolicy.objects.get)(model="")
    await sync_to_async(policy_update)(policy=policy, actor=ACTOR, strategy="least_requests")
    changed = time.monotonic()
    await wait_until_async(
        lambda: snapshots.current().routes["m"].policy.strategy == "least_requests", 1.0, "the change never arrived"
    )
    assert time.monotonic() - changed < 1.0


@pytest.mark.django_db(transaction=True)
async def test_the_watcher_falls_back_to_polling_the_database_when_redis_is_down(watcher):
    node = await sync_to_async(node_create)(actor=ACTOR, url="http://a:1", models=["m"], health="healthy")
    await watcher.start()  # Redis points at a closed port (see tests/conftest.py)
    assert snapshots.current().routes["m"].hybrid
    await sync_to_async(node_update)(node=node, actor=ACTOR, state=NodeState.DRAINING)
    await wait_until_async(lambda: not snapshots.current().routes["m"].hybrid, 2.0, "the database poll never saw it")


@pytest.mark.django_db(transaction=True)
async def test_a_rebuilt_snapshots_rings_are_built_off_the_loop_and_adopted_before_it_is_installed(watcher):
    await sync_to_async(node_create)(actor=ACTOR, url="http://a:1", models=["m"])
    policy = await sync_to_async(RoutePolicy.objects.get)(model="")
    await sync_to_async(policy_update)(policy=policy, actor=ACTOR, strategy="consistent_hash")
    router, seen = Router(), []
    prepare = router.prepare

    def watched(snapshot):
        seen.append(("built in", threading.current_thread() is threading.main_thread()))
        adopt = prepare(snapshot)
        return lambda: (seen.append(("adopted before install", snapshots.current() is not snapshot)), adopt())

    watcher.prepare = watched
    await watcher.start()
    assert seen == [("built in", False), ("adopted before install", True)]
    assert router._rings  # the route's ring, ready before the first request


@pytest.mark.django_db(transaction=True)
async def test_the_watcher_stops_even_when_a_redis_call_swallows_its_cancellation(watcher, monkeypatch):
    # redis-py on Python 3.11 can return a result instead of raising the cancellation that landed in
    # it; the watcher's loops must still end, or a web worker never exits on a restart.
    await sync_to_async(node_create)(actor=ACTOR, url="http://a:1", models=["m"])
    await watcher.start()
    inside = asyncio.Event()

    async def swallowing():
        inside.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return None  # as redis-py's wait_for may do
        return None

    monkeypatch.setattr(watcher, "_redis_version", swallowing)
    await asyncio.wait_for(inside.wait(), 5)
    await asyncio.wait_for(watcher.stop(), 5)


@pytest.mark.django_db(transaction=True)
async def test_a_failed_rebuild_keeps_the_previous_snapshot_and_is_retried(watcher, monkeypatch):
    await sync_to_async(node_create)(actor=ACTOR, url="http://a:1", models=["m"])
    await watcher.start()
    before = snapshots.current()
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("database is down")

    monkeypatch.setattr(snapshots, "build_snapshot", broken)
    assert not await watcher.refresh("test")
    assert snapshots.current() is before
    await asyncio.sleep(0.5)  # a window in which a retry on every 50 ms tick would show
    assert len(calls) == 1  # not retried on every 50 ms tick
    monkeypatch.undo()
    await wait_until_async(lambda: snapshots.current() is not before, 2.0, "the rebuild was never retried")


@pytest.mark.django_db(transaction=True)
async def test_stop_returns_once_the_snapshot_thread_has_finished_a_cancelled_rebuild(watcher, monkeypatch):
    """The rebuild goes on in the snapshot thread when its task is cancelled; ``stop`` waits for it,
    so the thread's database connection is closed before the worker exits."""
    await watcher.start()
    began, ended = threading.Event(), threading.Event()

    def slow_build():
        began.set()
        time.sleep(0.3)  # a rebuild that takes a while
        ended.set()
        raise RuntimeError("done")

    monkeypatch.setattr(snapshots, "build_snapshot", slow_build)
    rebuild = asyncio.create_task(watcher.refresh("test"))
    await wait_until_async(began.is_set, 5.0, "the rebuild never began")
    rebuild.cancel()
    await watcher.stop()
    assert ended.is_set()


@pytest.mark.django_db
def test_a_keys_max_concurrent_of_0_means_no_limit_as_on_nodes() -> None:
    api_key_create(actor=ACTOR, name="zero", max_concurrent=0)
    api_key_create(actor=ACTOR, name="two", max_concurrent=2)
    keys = {key.name: key for key in build_snapshot().keys.values()}
    assert (keys["zero"].max_concurrent, keys["two"].max_concurrent) == (None, 2)


@pytest.mark.django_db
def test_each_route_is_narrowed_per_endpoint_to_the_hybrid_nodes_that_serve_it():
    # Nodes that must route have passed a probe (a node never probed takes no traffic).
    node_create(actor=ACTOR, url="http://gen:1", models=["m"], engine_type="vllm", health="healthy")
    node_create(
        actor=ACTOR, url="http://pool:1", models=["m"], engine_type="vllm", endpoints=["embeddings"], health="healthy"
    )
    node_create(actor=ACTOR, url="http://down:1", models=["m"], engine_type="vllm", state=NodeState.DISABLED)
    node_create(actor=ACTOR, url="http://pre:1", models=["m"], engine_type="vllm", role="prefill")

    surface = build_snapshot().routes["m"].surface

    # vLLM's default (a generation model) for the nodes that list nothing; prefill nodes take none.
    assert set(surface) == {"chat", "completions", "responses", "tokenize", "detokenize", "embeddings"}
    assert [t.node.url for t in surface["responses"].targets] == ["http://down:1", "http://gen:1"]
    assert [t.node.url for t in surface["responses"].hybrid] == ["http://gen:1"]
    assert [t.node.url for t in surface["embeddings"].hybrid] == ["http://pool:1"]
    assert surface["embeddings"].mode == "hybrid" and not surface["embeddings"].prefill


@pytest.mark.django_db
def test_the_narrowed_routes_follow_the_live_health():
    a = node_create(actor=ACTOR, url="http://a:1", models=["m"], engine_type="vllm", health="healthy")
    node_create(actor=ACTOR, url="http://b:1", models=["m"], engine_type="vllm", health="healthy")
    snapshot = snapshots.with_health(build_snapshot(), {a.pk: "unhealthy"})
    assert [t.node.url for t in snapshot.routes["m"].surface["responses"].hybrid] == ["http://b:1"]
