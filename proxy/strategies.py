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
  load guard trips; otherwise ``least_requests``.

Stateful helpers are explicit arguments: the round-robin tick (a counter per model and role, kept
by ``proxy.router``), a cached ``HashRing`` and a bounded ``PrefixIndex``.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence

from .hashring import HashRing
from .load import LoadTracker
from .snapshot import Target

# Random draws that may miss (a node not ok) before a strategy walks the route instead.
SAMPLE_TRIES = 4

Ok = Callable[[Target], bool]
_rng = random.Random()


def every(target: Target) -> bool:
    """The filter that keeps every target (a strategy called on its own)."""
    return True


class Table:
    """What choosing from one tuple of targets needs beyond the tuple, built once per tuple in O(n):
    each node's position, and for weighted draws an alias table (Vose's method: a draw proportional
    to weight in O(1), one uniform slot and one coin)."""

    __slots__ = ("_alias", "position", "targets")

    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets = targets
        self.position = {t.node.id: i for i, t in enumerate(targets)}
        self._alias: tuple[list[float], list[int]] | None = None

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


class PrefixIndex:
    """Remembers which node recently served which prompt prefixes, in bounded memory.

    A prompt is cut into blocks: the first ``min_match`` characters, then ``block`` characters at
    a time, up to ``max_chars``. Each block boundary gets a chained hash (so it stands for the
    whole prefix up to there) mapped to a node id; entries are evicted least-recently-used beyond
    ``max_entries``. The longest remembered prefix wins.
    """

    def __init__(self, *, max_entries: int = 50_000, block: int = 128, max_chars: int = 16_384) -> None:
        self.max_entries = max_entries
        self.block = block
        self.max_chars = max_chars
        self._entries: OrderedDict[int, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def prefix_hashes(self, scope: str, prompt: str, min_match: int) -> list[int]:
        text = prompt[: self.max_chars]
        if len(text) < min_match:
            return []
        hashes = [hash((scope, text[:min_match]))]
        for start in range(min_match, len(text) - self.block + 1, self.block):
            hashes.append(hash((hashes[-1], text[start : start + self.block])))
        return hashes

    def longest(self, hashes: Sequence[int]) -> int | None:
        for h in reversed(hashes):
            node_id = self._entries.get(h)
            if node_id is not None:
                return node_id
        return None

    def longest_match(self, hashes: Sequence[int], min_match: int) -> tuple[int, int] | None:
        """``longest``'s node and how many prompt characters it is known to hold (for the request's
        explanation, ``proxy.explain``)."""
        for i in range(len(hashes) - 1, -1, -1):
            node_id = self._entries.get(hashes[i])
            if node_id is not None:
                return node_id, min_match + i * self.block
        return None

    def remember(self, hashes: Sequence[int], node_id: int) -> None:
        entries = self._entries
        for h in hashes:
            entries[h] = node_id
            entries.move_to_end(h)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)


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
) -> Target | None:
    """The node holding the longest shared prefix, unless it is ``load_factor`` times busier than
    least requests' pick (load guard); otherwise that pick. Remembers the choice."""
    fallback = least_requests(targets, load, tick, rng, ok)
    if fallback is None:
        return None
    chosen = fallback
    preferred_id = index.longest(hashes) if hashes else None
    if preferred_id is not None:
        at = (table or Table(targets)).position.get(preferred_id)
        preferred = targets[at] if at is not None else None
        if (
            preferred is not None
            and ok(preferred)
            and _load(preferred, load) <= load_factor * max(_load(fallback, load), 1.0)
        ):
            chosen = preferred
    if hashes:
        index.remember(hashes, chosen.node.id)
    return chosen
