"""Routing strategies as pure functions, and the router that applies them."""

from __future__ import annotations

import collections
import random

import pytest

from proxy import strategies
from proxy.load import LocalLoadTracker
from proxy.prefix import Spread
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
    # A node with no sample yet wins whenever it is a candidate: on its round-robin turn at the latest.
    assert strategies.min_observed_latency(ts, load, tick=2) is ts[2]
    assert all(strategies.min_observed_latency(ts[:2], load, tick) is ts[1] for tick in range(2))


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


def test_consistent_hash_moves_about_one_nth_of_the_keys_when_the_fleet_gains_or_loses_a_node():
    # The ring is rebuilt when a node joins or leaves the route: only the keys of the node that
    # joined (about its share) or left move; every other session keeps its node.
    ts = targets(*(1 + i % 3 for i in range(40)))
    keys = [f"session-{i}" for i in range(20_000)]

    def owners(ring: strategies.HashRing) -> dict[str, int | None]:
        return {key: ring.lookup(key, lambda node_id: True) for key in keys}

    before = owners(strategies.HashRing(ts))
    joined = targets(*(1 + i % 3 for i in range(41)))[-1]  # node 41
    with_41 = owners(strategies.HashRing([*ts, joined]))
    moved = [key for key in keys if with_41[key] != before[key]]
    assert all(with_41[key] == 41 for key in moved)
    share = joined.node.weight / sum(t.node.weight for t in [*ts, joined])
    assert 0.6 * share < len(moved) / len(keys) < 1.5 * share
    without_7 = owners(strategies.HashRing([t for t in ts if t.node.id != 7]))
    moved = [key for key in keys if without_7[key] != before[key]]
    assert moved and all(before[key] == 7 for key in moved)
    assert strategies.HashRing(ts).lookup("session-1", lambda node_id: False) is None


def test_a_consistent_hash_lookup_reads_a_table_as_large_at_two_nodes_as_at_a_thousand():
    # What keeps a consistent-hash choice as cheap at 1,000 nodes as at two (bench/route_micro.py):
    # a key reads one slot of a table whose size does not grow with the ring's 128,000 points.
    two = strategies.HashRing(targets(1, 2))
    thousand = strategies.HashRing(targets(*(1 + i % 3 for i in range(1000))))
    assert two.table_size == thousand.table_size
    # The table spreads keys over the thousand nodes in proportion to weight, as the ring does.
    counts = collections.Counter(thousand.lookup(f"user{i}", lambda node_id: True) for i in range(60_000))
    per_weight = collections.defaultdict(list)
    for node_id in range(1, 1001):
        weight = 1 + (node_id - 1) % 3
        per_weight[weight].append(counts[node_id] / weight)
    means = [sum(v) / len(v) for v in per_weight.values()]
    assert max(means) < 1.1 * min(means)


def test_the_rings_of_a_new_snapshot_are_built_before_it_routes_a_request(monkeypatch):
    # Built on first use, a ring over 1,000 nodes held the event loop (every request on it) for a
    # tenth of a second or more after each configuration change; the watcher's thread builds it.
    snap = make_snapshot(
        [{"url": f"http://n{i:03d}"} for i in range(50)], default_policy=PolicyView(strategy="consistent_hash")
    )
    router = Router()
    adopt = router.prepare(snap)  # in the snapshot watcher's thread
    adopt()  # on the loop, before the snapshot is installed

    def built_on_the_loop(*args, **kwargs):
        raise AssertionError("a hash ring was built on the request path")

    monkeypatch.setattr(strategies, "HashRing", built_on_the_loop)
    chosen = {router.choose(snap.routes["m"], "hybrid", payload={"user": f"u{i}"}).node.id for i in range(20)}
    assert len(chosen) > 1


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


def conversations_on(router: Router, route, conversations: list[list[str]]) -> list[list[str]]:
    """Play each conversation's turns (prompts) one after another through ``router``, nothing else in
    flight; the node of every turn, per conversation."""
    nodes = []
    for turns in conversations:
        picks = []
        for prompt in turns:
            target = router.choose(route, "hybrid", payload={"prompt": prompt})
            assert target is not None
            picks.append(target.node.url)
            router.release(target, 0.01, ok=True)
        nodes.append(picks)
    return nodes


def test_prefix_cache_spreads_new_conversations_by_the_work_already_placed():
    # Two turns each, one conversation after another: nothing is ever in flight, so least requests
    # (what a prompt with no remembered prefix used to get) always fell back to the round-robin
    # turn, which two requests per conversation keep on the same node: all six on one server.
    snap = make_snapshot([{"url": "http://a"}, {"url": "http://b"}], default_policy=PolicyView(strategy="prefix_cache"))
    system = [f"system: you are assistant {i}, " * 6 for i in range(6)]
    turns = [[s + "user: hello", s + "user: hello assistant: hi user: more please " * 3] for s in system]
    nodes = conversations_on(Router(), snap.routes["m"], turns)
    assert all(first == second for first, second in nodes)  # each kept its cache for its second turn
    assert collections.Counter(first for first, _ in nodes) == {"http://a": 3, "http://b": 3}


def test_prefix_cache_passes_over_an_owner_given_far_more_than_its_share():
    # Eight conversations on one system prompt: the prompt's owner used to take every one of them
    # (nothing in flight, so the load guard never tripped). The owner is passed over once it had more
    # than PREFIX_BALANCE times its share of the recent requests (plus PREFIX_SLACK), and the
    # prompt's blocks then belong to the node that computed them.
    snap = make_snapshot([{"url": "http://a"}, {"url": "http://b"}], default_policy=PolicyView(strategy="prefix_cache"))
    shared = "system: one long shared instruction for every conversation. " * 4
    nodes = conversations_on(Router(), snap.routes["m"], [[shared + f"user: question {i}"] for i in range(8)])
    per_node = collections.Counter(picks[0] for picks in nodes)
    assert sorted(per_node.values()) == [3, 5]


def test_prefix_cache_keeps_a_conversation_with_its_owner_and_balances_new_ones():
    # One long conversation, then new ones on its system prompt. The balance guard used to move the
    # long one off its node once that node had more than its share of the requests (its sixth turn
    # here), which cost it its whole cache; now only new conversations are balanced: they go to the
    # other node, and the shared start is all they give up.
    snap = make_snapshot([{"url": "http://a"}, {"url": "http://b"}], default_policy=PolicyView(strategy="prefix_cache"))
    system = "system: one long shared instruction for every conversation. " * 6
    long = [
        system + "".join(f"user: question {t} " * 10 + f"assistant: answer {t} " * 5 for t in range(n))
        for n in range(10)
    ]
    new = [[system + f"user: a question of conversation {i}, " * 8] for i in range(4)]
    nodes = conversations_on(Router(), snap.routes["m"], [long, *new])
    assert len(set(nodes[0])) == 1  # every turn of the long conversation on its first node
    assert {picks[0] for picks in nodes[1:]} == {"http://a", "http://b"} - set(nodes[0])


def test_a_continued_prompt_leaves_a_node_whose_queue_keeps_growing():
    # A conversation's next turn is worth PREFIX_SLACK more requests in flight on its owner than a
    # new one; past that the in-flight guard still moves it, so a node that stalls is left.
    ts = targets(1, 1)
    load = LocalLoadTracker()
    index = strategies.PrefixIndex(block=8)
    first_turn = "system: you are helpful " * 10 + "user: hello"
    first = strategies.prefix_cache(ts, load, index, index.prefix_hashes("m", first_turn, 32), 2.0)
    other = ts[1] if first is ts[0] else ts[0]
    second_turn = first_turn + " assistant: hi user: tell me more"
    third_turn = second_turn + " assistant: about what? user: the weather"
    busy(load, first, 4)  # 4 <= 2 x max(0, 1) + 2: the conversation stays
    assert strategies.prefix_cache(ts, load, index, index.prefix_hashes("m", second_turn, 32), 2.0) is first
    busy(load, first, 1)  # 5 > 4
    assert strategies.prefix_cache(ts, load, index, index.prefix_hashes("m", third_turn, 32), 2.0) is other


def test_prefix_cache_sends_a_new_conversation_away_from_the_node_with_the_long_one():
    # One node holds a conversation of ten turns, the other two conversations of one turn. By
    # placements alone (one against two) the next conversation went to the first node, which
    # already served most of the requests and keeps its long conversation.
    snap = make_snapshot([{"url": "http://a"}, {"url": "http://b"}], default_policy=PolicyView(strategy="prefix_cache"))
    system = [f"system: you are assistant {i}, " * 8 for i in range(4)]
    long = [system[0] + "".join(f"user: question {t} " * 10 for t in range(n)) for n in range(10)]
    nodes = conversations_on(Router(), snap.routes["m"], [long, [system[1]], [system[2]], [system[3]]])
    assert len(set(nodes[0])) == 1 and {nodes[1][0], nodes[2][0]} == {"http://a", "http://b"} - set(nodes[0])
    assert nodes[3][0] != nodes[0][0]


def test_the_prefix_index_tells_a_continued_prompt_from_a_shared_start():
    index = strategies.PrefixIndex(block=16)
    system = "system: you are a helpful assistant. " * 4
    first = system + "user: what is the capital of france?"
    index.remember(index.prefix_hashes("m", first, 32), 7)
    continued = index.prefix_hashes("m", first + " assistant: paris. user: and of italy?", 32)
    assert index.owner(continued) == (7, len(index.prefix_hashes("m", first, 32)), False)
    other = index.prefix_hashes("m", system + "user: how far away is the moon from the earth?", 32)
    found = index.owner(other)
    assert found is not None and found[0] == 7 and found[2]  # only the system prompt's blocks match
    assert index.owner(index.prefix_hashes("m", first, 32)) == (7, len(index.prefix_hashes("m", first, 32)), True)


def test_a_few_shared_characters_do_not_make_an_owner():
    # Every system prompt starts with the same 40 characters, more than the policy's minimum match:
    # each new conversation used to follow whichever node served them last, all six on one node here.
    snap = make_snapshot([{"url": "http://a"}, {"url": "http://b"}], default_policy=PolicyView(strategy="prefix_cache"))
    preamble = "system: the following is a conversation. "
    turns = [[preamble + f"you are assistant {i}. " * 20 + "user: hello"] for i in range(6)]
    nodes = conversations_on(Router(), snap.routes["m"], turns)
    assert collections.Counter(picks[0] for picks in nodes) == {"http://a": 3, "http://b": 3}


def test_the_spread_fades_with_the_route_requests_and_keeps_their_total():
    spread = Spread(window=4)
    for node_id in (1, 1, 2):
        spread.record(node_id, placed=node_id == 2)
    fade = 1 - 1 / 4
    assert spread.requests(1) == pytest.approx(fade**2 + fade)
    assert spread.requests(2) == pytest.approx(1.0)
    assert spread.placements(1) == 0 and spread.placements(2) == 1
    assert spread.total == pytest.approx(spread.requests(1) + spread.requests(2))
    assert spread.requests(3) == 0.0


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


STRATEGIES = (
    "round_robin",
    "weighted_random",
    "least_requests",
    "power_of_two",
    "min_observed_latency",
    "consistent_hash",
    "prefix_cache",
    "bogus",
)


def test_every_strategy_picks_a_routable_node():
    for strategy in STRATEGIES:
        snap = make_snapshot(
            [{"url": "http://a"}, {"url": "http://b", "state": "draining"}, {"url": "http://c"}],
            default_policy=PolicyView(strategy=strategy),
        )
        router = Router()
        for _ in range(10):
            target = router.choose(snap.routes["m"], "hybrid", payload={"messages": [], "user": "u"})
            assert target is not None and target.node.url != "http://b"
            router.release(target)


class CountingLoad(LocalLoadTracker):
    """Counts how many nodes the router's filter is asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def has_capacity(self, node: NodeView) -> bool:
        self.asked += 1
        return super().has_capacity(node)


def test_a_choice_looks_at_a_few_nodes_of_a_thousand_with_every_strategy():
    # What keeps a choice as cheap at 1,000 nodes as at two (bench/route_micro.py measures it): the
    # strategies ask the filter about a handful of candidates, never about every node of the route.
    nodes = [{"url": f"http://n{i:04d}", "weight": 1 + i % 3} for i in range(1000)]
    for strategy in STRATEGIES:
        snap = make_snapshot(nodes, default_policy=PolicyView(strategy=strategy))
        load = CountingLoad()
        router = Router(load=load)
        for i in range(50):
            payload = {"prompt": f"a prompt shared by a few requests {i % 5} " * 4, "user": f"u{i}"}
            target = router.choose(snap.routes["m"], "hybrid", payload=payload)
            assert target is not None
            router.release(target)
        assert load.asked <= 50 * 4, strategy


def test_with_most_of_a_thousand_nodes_full_every_strategy_finds_the_free_ones():
    nodes = [{"url": f"http://n{i:04d}", "max_concurrency": 1} for i in range(1000)]
    for strategy in STRATEGIES:
        snap = make_snapshot(nodes, default_policy=PolicyView(strategy=strategy))
        router = Router()
        for node in snap.nodes.values():
            if node.id not in (17, 801):
                assert router.load.try_acquire(node)
        payload = {"prompt": "x" * 64, "user": "u"}
        first = router.choose(snap.routes["m"], "hybrid", payload=payload)
        second = router.choose(snap.routes["m"], "hybrid", payload=payload)
        assert first is not None and second is not None, strategy
        assert {first.node.id, second.node.id} == {17, 801}, strategy
        assert router.choose(snap.routes["m"], "hybrid", payload=payload) is None, strategy


def test_least_requests_at_a_thousand_nodes_steers_away_from_busy_ones():
    nodes = [{"url": f"http://n{i:04d}"} for i in range(1000)]
    snap = make_snapshot(nodes, default_policy=PolicyView(strategy="least_requests"))
    router = Router(rng=random.Random(3))
    busy_ids = set(range(1, 1001, 2))
    for node_id in busy_ids:  # every other node has three requests in flight
        for _ in range(3):
            router.load.try_acquire(snap.nodes[node_id])
    picks = []
    for _ in range(400):
        target = router.choose(snap.routes["m"], "hybrid")
        assert target is not None
        picks.append(target.node.id)
        router.release(target)
    # Two choices: a busy node is picked only when both candidates are busy (about a quarter).
    assert sum(p in busy_ids for p in picks) < 0.35 * len(picks)


def test_round_robin_shares_turns_evenly_among_the_available_nodes():
    nodes = [{"url": f"http://n{i}"} for i in range(6)]
    snap = make_snapshot(nodes)
    router = Router()
    picks = collections.Counter()
    for _ in range(40):
        target = router.choose(snap.routes["m"], "hybrid", exclude={2, 3})  # a run of two left out
        assert target is not None
        picks[target.node.id] += 1
        router.release(target)
    assert picks == {1: 10, 4: 10, 5: 10, 6: 10}
