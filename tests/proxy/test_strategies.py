"""Routing strategies as pure functions, and the router that applies them."""

from __future__ import annotations

import collections
import random

from proxy import strategies
from proxy.load import LocalLoadTracker
from proxy.router import Router, prompt_text, session_key
from proxy.snapshot import NodeView, PolicyView, Target

from .conftest import make_snapshot


def targets(*weights: int) -> list[Target]:
    return [
        Target(
            NodeView(
                id=i,
                url=f"http://n{i}",
                engine_type="openai",
                role="hybrid",
                state="active",
                health="healthy",
                weight=w,
            ),
            "m",
        )
        for i, w in enumerate(weights, start=1)
    ]


def busy(load: LocalLoadTracker, target: Target, count: int) -> None:
    for _ in range(count):
        load.try_acquire(target.node)


def test_round_robin_cycles_through_the_available_targets():
    ts = targets(1, 1, 1)
    assert [strategies.round_robin(ts, tick).node.id for tick in range(6)] == [1, 2, 3, 1, 2, 3]


def test_weighted_random_follows_weights():
    ts = targets(1, 9)
    rng = random.Random(7)
    counts = collections.Counter(strategies.weighted_random(ts, rng).node.id for _ in range(2000))
    assert 0.85 < counts[2] / 2000 < 0.95


def test_least_requests_uses_in_flight_per_weight_and_rotates_ties():
    ts = targets(1, 2, 1)
    load = LocalLoadTracker()
    busy(load, ts[0], 2)
    busy(load, ts[1], 2)  # 2 / weight 2 = 1.0
    busy(load, ts[2], 1)
    assert strategies.least_requests(ts, load).node.id in {2, 3}
    idle = LocalLoadTracker()
    assert {strategies.least_requests(ts, idle, tick).node.id for tick in range(3)} == {1, 2, 3}


def test_power_of_two_picks_the_less_loaded_of_two():
    ts = targets(1, 1)
    load = LocalLoadTracker()
    busy(load, ts[0], 5)
    assert all(strategies.power_of_two(ts, load, random.Random(i)).node.id == 2 for i in range(20))


def test_min_observed_latency_prefers_fast_nodes_and_explores_new_ones():
    ts = targets(1, 1, 1)
    load = LocalLoadTracker()
    load.try_acquire(ts[0].node)
    load.release(1, 0.5)
    load.try_acquire(ts[1].node)
    load.release(2, 0.01)
    assert strategies.min_observed_latency(ts, load).node.id == 3  # no sample yet
    assert strategies.min_observed_latency(ts[:2], load).node.id == 2


def test_consistent_hash_is_stable_and_moves_only_a_removed_nodes_keys():
    ts = targets(1, 1, 1, 1)
    ring = strategies.HashRing(ts)
    load = LocalLoadTracker()
    before = {f"user{i}": strategies.consistent_hash(ts, ring, f"user{i}", load).node.id for i in range(400)}
    assert len(set(before.values())) == 4
    without_3 = [t for t in ts if t.node.id != 3]
    after = {key: strategies.consistent_hash(without_3, ring, key, load).node.id for key in before}
    moved = [key for key in before if before[key] != after[key]]
    assert moved and all(before[key] == 3 for key in moved)


def test_prefix_cache_needs_a_minimum_match_and_keeps_affinity_until_the_load_guard_trips():
    ts = targets(1, 1)
    load = LocalLoadTracker()
    index = strategies.PrefixIndex(block=8)
    prompt = "system: you are helpful " * 10
    assert index.prefix_hashes("m", "short", 32) == []
    hashes = index.prefix_hashes("m", prompt, 32)
    first = strategies.prefix_cache(ts, load, index, hashes, 2.0)
    other = ts[1] if first is ts[0] else ts[0]
    busy(load, first, 2)  # 2 <= 2 x max(0, 1): affinity holds
    assert strategies.prefix_cache(ts, load, index, hashes, 2.0) is first
    busy(load, first, 1)  # 3 > 2: abandon affinity for the least-loaded node
    assert strategies.prefix_cache(ts, load, index, hashes, 2.0) is other
    longer = index.prefix_hashes("m", prompt + "and more text here", 32)
    assert longer[: len(hashes)] == hashes


def test_the_prefix_index_is_bounded():
    index = strategies.PrefixIndex(max_entries=50, block=4)
    for i in range(100):
        index.remember(index.prefix_hashes("m", f"{i:04d}" * 30, 8), 1)
    assert len(index) == 50


def test_session_key_and_prompt_text_come_from_headers_then_body():
    assert session_key({"x-session-id": "s", "x-user-id": "u"}, {"user": "b"}) == "s"
    assert session_key({"x-user-id": "u"}, {"user": "b"}) == "u"
    assert session_key({}, {"user": "b"}) == "b"
    assert session_key({}, {}) is None
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert prompt_text(chat) == "user:hi\n"
    assert prompt_text({"prompt": "abc"}) == "abc"


def test_round_robin_counters_are_per_model_and_role():
    snap = make_snapshot(
        [{"url": "http://a", "models": ["m", "n"]}, {"url": "http://b", "models": ["m", "n"]}],
    )
    router = Router()
    picks = []
    for model in ("m", "n", "m", "n"):
        target = router.choose(snap.routes[model], "hybrid")
        assert target is not None
        picks.append((model, target.node.url))
        router.release(target)
    assert picks == [("m", "http://a"), ("n", "http://a"), ("m", "http://b"), ("n", "http://b")]


def test_the_router_skips_full_and_tried_nodes_and_releases_counters():
    snap = make_snapshot([{"url": "http://a", "max_concurrency": 1}, {"url": "http://b"}])
    route = snap.routes["m"]
    router = Router()
    a = router.choose(route, "hybrid")
    assert a is not None and a.node.url == "http://a"
    assert router.choose(route, "hybrid", exclude={2}) is None  # a is full, b excluded
    router.release(a)
    assert router.load.counts() == {}


def test_every_strategy_picks_a_routable_node():
    for strategy in (
        "round_robin",
        "weighted_random",
        "least_requests",
        "power_of_two",
        "min_observed_latency",
        "consistent_hash",
        "prefix_cache",
        "bogus",
    ):
        snap = make_snapshot(
            [{"url": "http://a"}, {"url": "http://b", "state": "draining"}, {"url": "http://c"}],
            default_policy=PolicyView(strategy=strategy),
        )
        router = Router()
        for _ in range(10):
            target = router.choose(snap.routes["m"], "hybrid", payload={"messages": [], "user": "u"})
            assert target is not None and target.node.url != "http://b"
            router.release(target)
