"""Routing strategies as small functions: given a route's targets of one role in rotation, the load
view and a filter, pick one.

Every strategy looks at a fixed handful of candidates, so a choice costs the same whether the route
has two nodes or a thousand (docs/decisions/0009-routing-cost-independent-of-fleet-size.md): no
strategy builds the list of available nodes. ``targets`` is a tuple of the snapshot's; ``ok`` is
``Router.choose``'s filter (not tried yet, under its concurrency limit, its breaker allows it),
asked only of the candidates a strategy looks at; a ``Table`` holds what is worth computing once per
tuple (positions, an alias table), which the router caches while the snapshot holds the tuple. A
strategy returns None only when no target is ok, which it learns by walking the route: the one path
that grows with the route, taken when (nearly) every node of it is excluded.

- ``round_robin``: the next ok target from the route's counter (``tick``).
- ``weighted_random``: a draw proportional to weight from an alias table (O(1)).
- ``least_requests`` and ``min_observed_latency``: two choices, the round-robin next one and one at
  random, the better of the two (fewest in flight per weight; lowest (in flight + 1) x mean
  latency); ties go to the round-robin one, so an idle route rotates and a node with no latency
  sample yet is tried when its turn comes. With two nodes this is the exact least.
- ``power_of_two``: two distinct candidates at random, the less loaded.
- ``consistent_hash``: a ring over the role's nodes (in rotation or not, so that a health change
  does not rebuild it), read through a lookup table of fixed size (``proxy.hashring``) and walked
  clockwise from the key to the first ok node in rotation.
- ``prefix_cache``: the node holding the longest remembered prefix (one lookup by id), unless the
  prompt starts a new conversation on a shared prefix and the node had more than its share of the
  route's recent requests, or the in-flight guard trips; otherwise, and for a prompt no node holds,
  the node given the least recent work of every node of a small route, or of two candidates as
  ``least_requests`` draws them (docs/cache-routing.md).

Stateful helpers are explicit arguments: the round-robin tick (a counter per model and role, kept
by ``proxy.router``), a cached ``HashRing``, a bounded ``PrefixIndex`` and a ``Spread`` per model
and role (``proxy.prefix``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from .hashring import HashRing
from .load import LoadTracker
from .prefix import PrefixIndex, Spread
from .snapshot import Target

# Random draws that may miss (a node not ok) before a strategy walks the route instead.
SAMPLE_TRIES = 4
# prefix_cache: a prompt placed away from its owner compares every node of a route this small (else two).
PLACE_CHOICES = 4
# prefix_cache: a new conversation on a prefix another conversation holds (its system prompt) is sent
# elsewhere when the prefix's owner had more than this many times its share of the route's recent
# requests, plus PREFIX_SLACK requests. A prompt that continues one its owner served (a conversation's
# next turn) stays with it whatever its share, unless the owner has PREFIX_SLACK more requests in
# flight than the in-flight guard allows: moving it costs the whole conversation's cache, moving a
# new one only its shared start (docs/cache-routing.md).
PREFIX_BALANCE = 1.15
PREFIX_SLACK = 2.0
# prefix_cache: a node owns a prompt when it holds at least this share of the prompt's blocks; a
# shorter match (a few characters every prompt starts with, less than an engine caches) is no reason
# to pile new conversations onto one node.
PREFIX_MIN_SHARE = 0.5

Ok = Callable[[Target], bool]
_rng = random.Random()


def every(target: Target) -> bool:
    """The filter that keeps every target (a strategy called on its own)."""
    return True


class Table:
    """What choosing from one tuple of targets needs beyond the tuple, built once per tuple in O(n):
    each node's position, and for weighted draws an alias table (Vose's method: a draw proportional
    to weight in O(1), one uniform slot and one coin)."""

    __slots__ = ("_alias", "_weight_total", "position", "targets")

    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets = targets
        self.position = {t.node.id: i for i, t in enumerate(targets)}
        self._alias: tuple[list[float], list[int]] | None = None
        self._weight_total: float | None = None

    def weight_total(self) -> float:
        """The sum of the targets' weights (a weight of 0 counts as 1, as the load strategies read it)."""
        if self._weight_total is None:
            self._weight_total = float(sum(t.node.weight or 1 for t in self.targets))
        return self._weight_total

    def alias(self) -> tuple[list[float], list[int]] | None:
        """(probability of keeping each slot, the slot given otherwise); None when no weight is positive."""
        if self._alias is None:
            weights = [max(t.node.weight, 0) for t in self.targets]
            total = sum(weights)
            if total <= 0:
                return None
            n = len(weights)
            keep = [w * n / total for w in weights]
            other = list(range(n))
            small = [i for i, p in enumerate(keep) if p < 1.0]
            large = [i for i, p in enumerate(keep) if p >= 1.0]
            while small and large:
                low, high = small.pop(), large.pop()
                other[low] = high
                keep[high] -= 1.0 - keep[low]
                (small if keep[high] < 1.0 else large).append(high)
            for i in small + large:  # rounding leftovers keep their own slot
                keep[i] = 1.0
            self._alias = (keep, other)
        return self._alias


def _load(target: Target, load: LoadTracker) -> float:
    return load.inflight(target.node.id) / (target.node.weight or 1)


def _walk(targets: Sequence[Target], start: int, ok: Ok, skip: int = -1) -> int:
    """The position of the first ok target from ``start`` on (wrapping, ``skip`` left out), -1 if none."""
    n = len(targets)
    for i in range(n):
        at = (start + i) % n
        if at != skip and ok(targets[at]):
            return at
    return -1


def _any(targets: Sequence[Target], rng: random.Random, ok: Ok) -> int:
    """The position of an ok target drawn at random, -1 if none."""
    n = len(targets)
    if not n:
        return -1
    for _ in range(SAMPLE_TRIES):
        at = int(rng.random() * n)
        if ok(targets[at]):
            return at
    return _walk(targets, int(rng.random() * n), ok)


def _other(targets: Sequence[Target], first: int, rng: random.Random, ok: Ok) -> int:
    """The position of an ok target other than ``first``, drawn at random; -1 if none."""
    n = len(targets)
    if n < 2:
        return -1
    for _ in range(SAMPLE_TRIES):
        at = (first + 1 + int(rng.random() * (n - 1))) % n
        if ok(targets[at]):
            return at
    return _walk(targets, int(rng.random() * n), ok, skip=first)


def _pair(targets: Sequence[Target], tick: int, rng: random.Random, ok: Ok) -> tuple[Target | None, Target | None]:
    """The round-robin next ok target and another ok one at random (None where there is none)."""
    if not targets:
        return None, None
    first = _walk(targets, tick % len(targets), ok)
    if first < 0:
        return None, None
    second = _other(targets, first, rng, ok)
    return targets[first], (targets[second] if second >= 0 else None)


def round_robin(targets: Sequence[Target], tick: int, ok: Ok = every) -> Target | None:
    if not targets:
        return None
    at = _walk(targets, tick % len(targets), ok)
    return targets[at] if at >= 0 else None


def weighted_random(
    targets: Sequence[Target], rng: random.Random, ok: Ok = every, table: Table | None = None
) -> Target | None:
    alias = (table or Table(targets)).alias()
    if alias is None:  # no positive weight: every node alike
        at = _any(targets, rng, ok)
        return targets[at] if at >= 0 else None
    keep, other = alias
    n = len(targets)
    for _ in range(SAMPLE_TRIES):
        slot = rng.random() * n
        at = int(slot)
        target = targets[at if slot - at < keep[at] else other[at]]
        if ok(target):
            return target
    available = [t for t in targets if ok(t)]  # most of the weight is excluded: draw among the rest
    if not available:
        return None
    weights = [t.node.weight for t in available]
    return rng.choices(available, weights=weights)[0] if any(weights) else rng.choice(available)


def least_requests(
    targets: Sequence[Target], load: LoadTracker, tick: int = 0, rng: random.Random | None = None, ok: Ok = every
) -> Target | None:
    """Of two candidates (see the module doc), the fewest in flight per unit of weight."""
    first, second = _pair(targets, tick, rng or _rng, ok)
    if first is None or second is None:
        return first
    return second if _load(second, load) < _load(first, load) else first


def power_of_two(targets: Sequence[Target], load: LoadTracker, rng: random.Random, ok: Ok = every) -> Target | None:
    first = _any(targets, rng, ok)
    if first < 0:
        return None
    second = _other(targets, first, rng, ok)
    if second < 0:
        return targets[first]
    a, b = targets[first], targets[second]
    return b if _load(b, load) < _load(a, load) else a


def _latency_score(target: Target, load: LoadTracker) -> float:
    node_id = target.node.id
    return (load.inflight(node_id) + 1) * load.latency(node_id) / (target.node.weight or 1)


def min_observed_latency(
    targets: Sequence[Target], load: LoadTracker, tick: int = 0, rng: random.Random | None = None, ok: Ok = every
) -> Target | None:
    """Of two candidates (see the module doc), the lowest (in-flight + 1) * recent mean latency. A
    node with no sample yet scores 0, so it is tried when it is a candidate and gets a measurement."""
    first, second = _pair(targets, tick, rng or _rng, ok)
    if first is None or second is None:
        return first
    return second if _latency_score(second, load) < _latency_score(first, load) else first


def consistent_hash(
    targets: Sequence[Target],
    ring: HashRing,
    session_key: str | None,
    load: LoadTracker,
    tick: int = 0,
    rng: random.Random | None = None,
    ok: Ok = every,
    table: Table | None = None,
) -> Target | None:
    """The ring's node for ``session_key`` among ``targets``; without a key, least requests. The ring
    may hold nodes that are not in ``targets`` (out of rotation): they are passed over."""
    if session_key:
        position = (table or Table(targets)).position

        def usable(node_id: int) -> bool:
            at = position.get(node_id)
            return at is not None and ok(targets[at])

        node_id = ring.lookup(session_key, usable)
        if node_id is not None:
            return targets[position[node_id]]
    return least_requests(targets, load, tick, rng, ok)


def _least_given(
    targets: Sequence[Target], spread: Spread, load: LoadTracker, tick: int, rng: random.Random, ok: Ok
) -> Target | None:
    """Of a few ok candidates, the one ``spread`` gave the least recent work per unit of weight
    (then requests, then in flight, then the earliest in rotation): every node of a route of up to
    ``PLACE_CHOICES`` nodes, else ``least_requests``' two (the round-robin next one and one at
    random). The work is the node's placements (new conversations: one counts at once, before its
    later turns come) plus its recent requests counted in conversations (over the route's requests
    per placement): a node that got the long conversations gets fewer new ones, since a
    conversation stays where it started (docs/cache-routing.md)."""
    n = len(targets)
    if n <= PLACE_CHOICES:
        candidates = [t for t in (targets[(tick + i) % n] for i in range(n)) if ok(t)]
    else:
        candidates = [t for t in _pair(targets, tick, rng, ok) if t is not None]
    best: Target | None = None
    best_score = (0.0, 0.0, 0.0)
    per_placement = max(spread.total / spread.placed, 1.0) if spread.placed else 1.0
    for target in candidates:
        node = target.node
        weight = node.weight or 1
        requests, placements = spread.given(node.id)
        work = placements + requests / per_placement
        score = (work / weight, requests / weight, load.inflight(node.id) / weight)
        if best is None or score < best_score:
            best, best_score = target, score
    return best


def prefix_cache(
    targets: Sequence[Target],
    load: LoadTracker,
    index: PrefixIndex,
    hashes: Sequence[int],
    load_factor: float,
    tick: int = 0,
    rng: random.Random | None = None,
    ok: Ok = every,
    table: Table | None = None,
    spread: Spread | None = None,
    balance: float | None = None,
) -> Target | None:
    """The node holding the longest remembered prefix of the prompt (its owner, when that prefix is
    at least ``PREFIX_MIN_SHARE`` of the prompt's blocks), unless a guard trips; otherwise, and
    for a prompt with no owner, the node given the least recent work (``_least_given``): new
    conversations are spread by the conversations each node was given, not by the requests in
    flight at the instant they arrive, which at low concurrency is a coin toss that leaves one
    server with most conversations and another with none.

    Guards: a **shared** match (``PrefixIndex.owner``: the prompt starts a new conversation on a
    prefix another one holds, a system prompt) is passed over when ``spread`` gave its owner more
    than ``balance`` (default ``PREFIX_BALANCE``) times its weighted share of the route's recent
    requests, plus ``PREFIX_SLACK``; moving it costs only that prefix. A prompt that continues one
    its owner served stays whatever the owner's share (moving it would cost the whole
    conversation's cache, which the balance guard did at every turn it tripped); new conversations,
    spread by placements, keep the balance. Either is passed over when its owner has more than
    ``load_factor`` times the in-flight requests of least requests' pick (at least one), plus
    ``PREFIX_SLACK`` for a continued prompt. The prompt's blocks are then remembered for the node
    that computes them, which holds the whole prompt from then on (keeping the old owner instead kept
    every conversation on a shared system prompt on one server: docs/cache-routing.md)."""
    rng = rng or _rng
    balance = PREFIX_BALANCE if balance is None else balance
    spread = spread if spread is not None else Spread()
    table = table or Table(targets)
    owner: Target | None = None
    shared = False
    found = index.owner(hashes) if hashes else None
    if found is not None and found[1] >= PREFIX_MIN_SHARE * len(hashes):
        at = table.position.get(found[0])
        if at is not None and ok(targets[at]):
            owner, shared = targets[at], found[2]
    chosen = owner
    if owner is not None:
        over = False
        if shared:  # the owner's weighted share of the route's recent requests
            total_weight = table.weight_total()
            share = spread.total * (owner.node.weight or 1) / total_weight if total_weight else 0.0
            over = spread.requests(owner.node.id) > balance * share + PREFIX_SLACK
        if over:
            chosen = None
        else:
            fallback = least_requests(targets, load, tick, rng, ok)
            if fallback is not None:
                limit = load_factor * max(_load(fallback, load), 1.0) + (0.0 if shared else PREFIX_SLACK)
                if _load(owner, load) > limit:
                    chosen = None
    if chosen is None:
        chosen = _least_given(targets, spread, load, tick, rng, ok)
        if chosen is None:
            return None
    spread.record(chosen.node.id, placed=chosen is not owner or shared)
    if hashes:
        index.remember(hashes, chosen.node.id)
    return chosen
