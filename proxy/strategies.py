"""Routing strategies as small functions: given the available targets (routable, under their
concurrency limit, not yet tried) and the load view, pick one.

Stateful helpers are explicit arguments: the round-robin tick (a counter per model and role, kept
by ``proxy.router``), a cached ``HashRing`` and a bounded ``PrefixIndex``. ``available`` is never
empty when a strategy is called.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections import OrderedDict
from collections.abc import Container, Iterable, Sequence

from .load import LoadTracker
from .snapshot import Target

# Each node gets this many points on the consistent-hash ring per unit of weight (capped).
RING_POINTS_PER_WEIGHT = 64
RING_MAX_POINTS_PER_NODE = 64 * 16


def _load(target: Target, load: LoadTracker) -> float:
    return load.inflight(target.node.id) / (target.node.weight or 1)


def round_robin(available: Sequence[Target], tick: int) -> Target:
    return available[tick % len(available)]


def weighted_random(available: Sequence[Target], rng: random.Random) -> Target:
    weights = [t.node.weight for t in available]
    if not any(weights):
        return rng.choice(available)
    return rng.choices(available, weights=weights)[0]


def least_requests(available: Sequence[Target], load: LoadTracker, tick: int = 0) -> Target:
    """Fewest in-flight requests per unit of weight; ties go round-robin (scan starts at ``tick``)."""
    n = len(available)
    best = available[tick % n]
    best_load = _load(best, load)
    for i in range(1, n):
        candidate = available[(tick + i) % n]
        candidate_load = _load(candidate, load)
        if candidate_load < best_load:
            best, best_load = candidate, candidate_load
    return best


def power_of_two(available: Sequence[Target], load: LoadTracker, rng: random.Random) -> Target:
    if len(available) == 1:
        return available[0]
    a, b = rng.sample(available, 2)
    return b if _load(b, load) < _load(a, load) else a


def min_observed_latency(available: Sequence[Target], load: LoadTracker, tick: int = 0) -> Target:
    """Lowest (in-flight + 1) * recent mean latency. A node with no sample yet scores 0, so new
    nodes are tried first and get a measurement."""
    n = len(available)
    best = None
    best_score = 0.0
    for i in range(n):
        candidate = available[(tick + i) % n]
        node_id = candidate.node.id
        score = (load.inflight(node_id) + 1) * load.latency(node_id) / (candidate.node.weight or 1)
        if best is None or score < best_score:
            best, best_score = candidate, score
    assert best is not None
    return best


def _hash64(text: str) -> int:
    # surrogatepass: a session key from the client's JSON ("user") may hold a lone surrogate, which
    # strict UTF-8 cannot encode; any fixed bytes do for a hash.
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring over nodes (virtual points proportional to weight). Built once per
    set of targets and cached; a lookup walks clockwise to the first available node, so a node
    that is busy or gone moves only its own keys."""

    def __init__(self, targets: Iterable[Target]) -> None:
        points: list[tuple[int, int]] = []
        for target in targets:
            count = min(RING_POINTS_PER_WEIGHT * max(target.node.weight, 1), RING_MAX_POINTS_PER_NODE)
            points.extend((_hash64(f"{target.node.url}#{i}"), target.node.id) for i in range(count))
        points.sort()
        self._hashes = [p[0] for p in points]
        self._node_ids = [p[1] for p in points]
        self._distinct = len(set(self._node_ids))

    def lookup(self, key: str, available_ids: Container[int]) -> int | None:
        if not self._hashes:
            return None
        start = bisect.bisect(self._hashes, _hash64(key))
        n = len(self._hashes)
        seen: set[int] = set()
        for i in range(n):
            node_id = self._node_ids[(start + i) % n]
            if node_id in available_ids:
                return node_id
            seen.add(node_id)
            if len(seen) >= self._distinct:
                break
        return None


def consistent_hash(
    available: Sequence[Target], ring: HashRing, session_key: str | None, load: LoadTracker, tick: int = 0
) -> Target:
    """The ring's node for ``session_key``; without a key, least requests."""
    if session_key:
        by_id = {t.node.id: t for t in available}
        node_id = ring.lookup(session_key, by_id.keys())
        if node_id is not None:
            return by_id[node_id]
    return least_requests(available, load, tick)


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
    available: Sequence[Target],
    load: LoadTracker,
    index: PrefixIndex,
    hashes: Sequence[int],
    load_factor: float,
    tick: int = 0,
) -> Target:
    """The node holding the longest shared prefix, unless it is ``load_factor`` times busier than
    the least-loaded node (load guard); otherwise least requests. Remembers the choice."""
    fallback = least_requests(available, load, tick)
    chosen = fallback
    preferred_id = index.longest(hashes) if hashes else None
    if preferred_id is not None:
        preferred = next((t for t in available if t.node.id == preferred_id), None)
        if preferred is not None and _load(preferred, load) <= load_factor * max(_load(fallback, load), 1.0):
            chosen = preferred
    if hashes:
        index.remember(hashes, chosen.node.id)
    return chosen
