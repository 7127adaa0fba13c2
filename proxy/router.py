"""Choosing a node for a request: filters the route's targets to those available now, applies the
route policy's strategy, and takes a slot on the chosen node.

The ``Router`` owns the per-process mutable state the strategies need (round-robin counters per
model and role, cached hash rings, the prefix index) and the ``LoadTracker``. It survives snapshot
swaps, so affinity and counters are not reset by an unrelated configuration change.

It also knows which attempts are waiting for a node's first byte, so that a node taken out of
rotation releases them at once (``eject``): when its circuit breaker opens (``Breakers.on_open``)
and when this worker learns it is unhealthy (``eject_unhealthy``, called with every routing
snapshot the watcher installs). Those attempts are retried on other nodes (``proxy.attempts``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol

from django.conf import settings

from nodes.choices import ExclusionReason, NodeHealth, Strategy
from nodes.live.explain import LISTED_CANDIDATES, NAMED_PER_REASON, WireExcluded

from . import strategies
from .breaker import HALF_OPEN, OPEN, Breakers
from .load import LoadTracker, LocalLoadTracker
from .prefix import Spread
from .snapshot import NodeView, Route, Snapshot, Target

if TYPE_CHECKING:
    from .explain import Explanation

logger = logging.getLogger(__name__)

_RING_CACHE_MAX = 256
_TABLE_CACHE_MAX = 1024
_NO_RING = strategies.HashRing(())
# The strategies ``choose`` compares with on every request, looked up once, as
# ``proxy.snapshot.ROLE_*`` are.
_LEAST_REQUESTS, _WEIGHTED_RANDOM = Strategy.LEAST_REQUESTS, Strategy.WEIGHTED_RANDOM
_POWER_OF_TWO, _MIN_OBSERVED_LATENCY = Strategy.POWER_OF_TWO, Strategy.MIN_OBSERVED_LATENCY
_CONSISTENT_HASH, _PREFIX_CACHE = Strategy.CONSISTENT_HASH, Strategy.PREFIX_CACHE


class Waiter(Protocol):
    """An attempt waiting for its node's first byte (``proxy.attempts.Attempt``)."""

    def eject(self) -> None: ...


def session_key(headers: dict[str, str], payload: dict[str, Any]) -> str | None:
    """The consistent-hash key: ``x-session-id``, then ``x-user-id``, then the body's ``user``."""
    key = headers.get("x-session-id") or headers.get("x-user-id")
    if key:
        return key
    user = payload.get("user")
    return user if isinstance(user, str) and user else None


def prompt_text(payload: dict[str, Any]) -> str:
    """The text a prefix cache would share: chat messages (role and text parts) or the prompt."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"{message.get('role', '')}:{content if isinstance(content, str) else ''}\n")
        return "".join(parts)
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        return first if isinstance(first, str) else " ".join(str(t) for t in prompt)
    return ""


class Router:
    def __init__(
        self,
        load: LoadTracker | None = None,
        *,
        prefix_index: strategies.PrefixIndex | None = None,
        rng: random.Random | None = None,
        breakers: Breakers | None = None,
    ) -> None:
        self.load: LoadTracker = load or LocalLoadTracker()
        self.breakers = breakers or Breakers(
            failures=settings.ROUTERPANEL_BREAKER_FAILURES, cooldown=settings.ROUTERPANEL_BREAKER_COOLDOWN
        )
        self.prefix_index = prefix_index or strategies.PrefixIndex(
            max_entries=settings.ROUTERPANEL_PROXY_PREFIX_CACHE_ENTRIES
        )
        self.rng = rng or random.Random()
        self._ticks: dict[tuple[str, str], int] = {}
        self._spreads: dict[tuple[str, str], Spread] = {}  # (model, role) -> recent requests per node (prefix_cache)
        self._tables: dict[int, strategies.Table] = {}  # id of a targets tuple -> its table
        self._rings: dict[int, tuple[tuple[Target, ...], strategies.HashRing]] = {}  # id of a tuple -> it, its ring
        self._waiting: dict[int, set[Waiter]] = {}  # node id -> attempts waiting for its first byte
        self.breakers.on_open = self.eject
        self.ejected = 0  # attempts released by eject, for tests and logs

    def _tick(self, model: str, role: str) -> int:
        key = (model, role)
        tick = self._ticks.get(key, 0)
        self._ticks[key] = tick + 1
        return tick

    def _table(self, targets: tuple[Target, ...]) -> strategies.Table:
        """``targets``' table, built on first use and kept while the snapshot holds the tuple."""
        table = self._tables.get(id(targets))
        if table is None or table.targets is not targets:
            if len(self._tables) >= _TABLE_CACHE_MAX:
                self._tables.clear()
            table = self._tables[id(targets)] = strategies.Table(targets)
        return table

    def prepare(self, snapshot: Snapshot) -> Callable[[], None]:
        """Build the hash rings ``snapshot``'s consistent-hash routes will read, in the snapshot
        watcher's thread, and return what adopts them on the loop before the snapshot is installed.
        Built on first use instead, a ring over 1,000 nodes (128,000 hashes) held the loop, and every
        request on it, for 0.1-0.35 s after each configuration change."""
        rings: dict[int, tuple[tuple[Target, ...], strategies.HashRing]] = {}
        for route in snapshot.routes.values():
            if route.policy.strategy != Strategy.CONSISTENT_HASH:
                continue
            for members in route.members.values():
                rings[id(members.targets)] = self._cached_ring(members.targets)  # reads; only the loop writes

        def adopt() -> None:
            self._rings = rings  # the replaced snapshot's rings go with it

        return adopt

    def _ring(self, route: Route, role: str, targets: tuple[Target, ...]) -> strategies.HashRing:
        """The ring over every node of ``role`` serving ``route``, in rotation or not: a health
        change keeps it (a node out of rotation is passed over), a configuration rebuild renews it."""
        members = route.members.get(role)
        nodes = members.targets if members is not None else targets
        cached = self._cached_ring(nodes)
        if self._rings.get(id(nodes)) is not cached:
            if len(self._rings) >= _RING_CACHE_MAX:
                self._rings.clear()
            self._rings[id(nodes)] = cached
        return cached[1]

    def _cached_ring(self, nodes: tuple[Target, ...]) -> tuple[tuple[Target, ...], strategies.HashRing]:
        """``nodes``' ring from the cache, or a new one (not stored: the caller decides)."""
        cached = self._rings.get(id(nodes))
        if cached is None or cached[0] is not nodes:
            cached = (nodes, strategies.HashRing(nodes))
        return cached

    def choose(
        self,
        route: Route,
        role: str,
        *,
        exclude: Collection[int] = (),
        headers: dict[str, str] | None = None,
        payload: dict[str, Any] | None = None,
        explain: Explanation | None = None,
        defer: bool = False,
    ) -> Target | None:
        """Pick a target of ``role`` for ``route`` and acquire a slot on its node; None when no
        node is available (none routable, all at their limit, or all already tried). The strategy
        asks the filter about the few candidates it looks at (``proxy.strategies``), so the cost
        does not grow with the route. ``explain`` records the decision (``proxy.explain``); with
        ``defer`` a pick's figures are read by ``Explanation.settle``, which the caller calls
        before anything else runs on the loop (the attempt loop: once the request is written)."""
        if explain is not None and explain.pending is not None:  # an earlier pick's, recorded first
            explain.settle()
        targets = route.by_role(role)
        has_capacity = self.load.has_capacity
        allows = self.breakers.allows

        def ok(target: Target) -> bool:
            # Keep in step with ``exclusion_reason``, which says why a target was left out here.
            node = target.node
            return node.id not in exclude and has_capacity(node) and allows(node.id)

        table = self._table(targets)
        policy = route.policy
        strategy = policy.strategy
        tick = self._tick(route.name, role)
        load, rng = self.load, self.rng
        prefix: tuple[int, int] | None = None
        chosen: Target | None
        if strategy == _LEAST_REQUESTS:
            chosen = strategies.least_requests(targets, load, tick, rng, ok)
        elif strategy == _WEIGHTED_RANDOM:
            chosen = strategies.weighted_random(targets, rng, ok, table)
        elif strategy == _POWER_OF_TWO:
            chosen = strategies.power_of_two(targets, load, rng, ok)
        elif strategy == _MIN_OBSERVED_LATENCY:
            chosen = strategies.min_observed_latency(targets, load, tick, rng, ok)
        elif strategy == _CONSISTENT_HASH:
            key = session_key(headers or {}, payload or {})
            ring = self._ring(route, role, targets) if key else _NO_RING
            chosen = strategies.consistent_hash(targets, ring, key, load, tick, rng, ok, table)
        elif strategy == _PREFIX_CACHE:
            hashes = self.prefix_index.prefix_hashes(
                f"{route.name}/{role}", prompt_text(payload or {}), policy.prefix_min_match
            )
            if explain is not None:  # before the strategy remembers this prompt for its pick
                prefix = self.prefix_index.longest_match(hashes, policy.prefix_min_match)
            spread = self._spreads.get((route.name, role))
            if spread is None:
                spread = self._spreads[(route.name, role)] = Spread()
            chosen = strategies.prefix_cache(
                targets, load, self.prefix_index, hashes, policy.prefix_load_factor, tick, rng, ok, table, spread
            )
        else:  # round robin, the default (also for an unknown name in the database)
            chosen = strategies.round_robin(targets, tick, ok)
            if chosen is not None:  # the counter goes on after the pick: skipped turns are nobody's
                self._ticks[(route.name, role)] = table.position[chosen.node.id] + 1
        if chosen is None or not load.try_acquire(chosen.node):  # the latter cannot happen on one loop
            if explain is not None:
                listed = self.listed(table, chosen, ok) if chosen is not None else ()
                explain.chose(self, role, len(targets), self.left_out(table, exclude, ok), listed, prefix)
            return None
        self.breakers.acquired(chosen.node.id)
        if explain is not None:
            if defer:  # ``exclude`` as it is now: the caller's list of tried nodes gets the pick next
                tried = tuple(exclude) if exclude else ()
                explain.pending = (self, role, len(targets), table, tried, ok, chosen, prefix)
            else:
                explain.picked(self, role, len(targets), table, exclude, ok, chosen, prefix)
        return chosen

    # -- Explanations (``proxy.explain``): as cheap at a thousand nodes as at two -------------------

    def left_out(
        self, table: strategies.Table, exclude: Collection[int], ok: strategies.Ok, *, taken: int | None = None
    ) -> WireExcluded:
        """The targets of ``table`` that ``choose``'s filter ``ok`` leaves out, by reason: reason ->
        [count, the first few nodes' (id, URL) in route order]; None when it leaves none out. Found without
        walking the route: only a node already tried, with requests in flight against a concurrency
        limit (``LoadTracker.limited``) or behind a breaker (``Breakers.tripped``) can be left out, and
        those are few however large the fleet. ``taken``: the node just picked, never among them."""
        limited, broken = self.load.limited(), self.breakers.tripped
        if not (exclude or limited or broken):
            return None  # the usual case: nothing to look at
        position, targets = table.position, table.targets
        suspects = {*exclude, *limited, *broken}
        if taken is not None:
            suspects.discard(taken)
        hits = sorted(at for node_id in suspects if (at := position.get(node_id)) is not None and not ok(targets[at]))
        if not hits:
            return None
        reasons: dict[str, list[Any]] = {}
        for at in hits:
            node = targets[at].node
            reason = self.exclusion_reason(node, exclude)
            entry = reasons.get(reason)
            if entry is None:
                reasons[reason] = [1, [(node.id, node.url)]]
            else:
                entry[0] += 1
                if len(entry[1]) < NAMED_PER_REASON:
                    entry[1].append((node.id, node.url))
        return reasons

    @staticmethod
    def listed(table: strategies.Table, chosen: Target, ok: strategies.Ok) -> tuple[Target, ...]:
        """The pick and the next ``LISTED_CANDIDATES - 1`` ok targets after it in route order, looking
        at no more than a few times that many."""
        targets = table.targets
        n = len(targets)
        start = table.position[chosen.node.id]
        listed = [chosen]
        for step in range(1, min(n, 4 * LISTED_CANDIDATES)):
            target = targets[(start + step) % n]
            if ok(target):
                listed.append(target)
                if len(listed) == LISTED_CANDIDATES:
                    break
        return tuple(listed)

    def exclusion_reason(self, node: NodeView, exclude: Collection[int]) -> str:
        """Why ``choose``'s filter leaves ``node`` out (an ``ExclusionReason`` value). Only for a node
        it did leave out, right after, on the same turn of the event loop: reads, never changes."""
        if node.id in exclude:
            return ExclusionReason.TRIED.value
        if not self.load.has_capacity(node):
            return ExclusionReason.MAX_CONCURRENCY.value
        state = self.breakers.state(node.id)
        if state == OPEN:
            return ExclusionReason.BREAKER_OPEN.value
        if state == HALF_OPEN:
            return ExclusionReason.BREAKER_TRIAL.value
        return ExclusionReason.OTHER.value  # a filter condition this method was not told about

    def release(self, target: Target, elapsed: float | None = None, *, ok: bool | None = None) -> None:
        """Free the slot taken by ``choose``; ``ok`` feeds the node's circuit breaker (True: a
        healthy answer, False: connect error, timeout or 5xx, None: no verdict, e.g. client left)."""
        self.load.release(target.node.id, elapsed)
        if ok is True:
            self.breakers.success(target.node.id)
        elif ok is False:
            self.breakers.failure(target.node.id)
        else:
            self.breakers.released(target.node.id)

    # -- Ejection ---------------------------------------------------------------------------------

    def waiting(self, node_id: int, waiter: Waiter) -> None:
        """``waiter`` is waiting for ``node_id``'s first byte (until ``done_waiting``)."""
        waiters = self._waiting.get(node_id)
        if waiters is None:
            self._waiting[node_id] = {waiter}
        else:
            waiters.add(waiter)

    def done_waiting(self, node_id: int, waiter: Waiter) -> None:
        waiters = self._waiting.get(node_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiting[node_id]

    def eject(self, node_id: int) -> int:
        """The node is out of rotation: every attempt still waiting for its first byte stops waiting
        and is retried on another node. Call it whenever this worker learns a node is unhealthy or
        failing; O(waiters of that node), synchronous, on the event loop. Returns how many."""
        waiters = self._waiting.pop(node_id, None)
        if not waiters:
            return 0
        for waiter in waiters:
            waiter.eject()
        self.ejected += len(waiters)
        logger.warning("node %s is out of rotation: %d request(s) waiting on it go elsewhere", node_id, len(waiters))
        return len(waiters)

    def eject_unhealthy(self, snapshot: Snapshot) -> int:
        """``eject`` every node that ``snapshot`` (just installed) says is unhealthy, by the live health
        it routes by (``Snapshot.health_of``); only the nodes with waiters are looked at, so this costs
        nothing while nobody waits."""
        ejected = 0
        for node_id in list(self._waiting):
            node = snapshot.nodes.get(node_id)
            if node is not None and snapshot.health_of(node) == NodeHealth.UNHEALTHY:
                ejected += self.eject(node_id)
        return ejected
