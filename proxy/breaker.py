"""Passive health: a circuit breaker per node, fed by the outcome of real requests.

Only failures that say something about the node count: connect errors, timeouts and 5xx answers —
never a 4xx, which is the client's problem. After ``failures`` consecutive ones the breaker opens
and the node gets no requests; after ``cooldown`` seconds one trial request is let through
(half-open); its success closes the breaker, its failure opens it again.

The state is shared by every web worker: each transition is queued here and written to the Redis
hash ``nodes.live.keys.BREAKERS`` (as ``nodes.live.breakers.BreakerRecord``) by the worker's sync
loop (``proxy.shared``), which also reads the hash back and adopts any newer transition another
worker made. The hot-path methods are synchronous and O(1).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.typing import EncodableT, FieldT

from nodes.choices import BreakerState
from nodes.live.breakers import BreakerRecord, encode

# Plain strings on the hot path; their one definition is nodes.choices.BreakerState.
CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED.value, BreakerState.OPEN.value, BreakerState.HALF_OPEN.value


@dataclass
class NodeBreaker:
    state: str = CLOSED
    failures: int = 0
    until: float = 0.0  # wall-clock time the open state ends
    changed_at: float = 0.0  # wall-clock time of the last transition (newest wins across workers)
    trial: bool = False  # a half-open trial request is in flight


class Breakers:
    def __init__(self, *, failures: int = 5, cooldown: float = 5.0) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self.nodes: dict[int, NodeBreaker] = {}  # every node that failed once, closed again or not
        # The nodes whose breaker is open or half-open: the only ones it can keep from a request, which
        # the router's explanations look at (``Router.left_out``), however many nodes ever failed.
        self.tripped: set[int] = set()
        self.pending: dict[int, BreakerRecord] = {}  # transitions to publish
        # Called with a node's id when its breaker opens, here or in another worker (``Router.eject``:
        # requests still waiting on that node go elsewhere).
        self.on_open: Callable[[int], object] | None = None

    def state(self, node_id: int) -> str:
        breaker = self.nodes.get(node_id)
        return breaker.state if breaker else CLOSED

    def allows(self, node_id: int, now: float | None = None) -> bool:
        """May a new request go to this node? Turns an expired open breaker half-open."""
        breaker = self.nodes.get(node_id)
        if breaker is None or breaker.state == CLOSED:
            return True
        now = time.time() if now is None else now
        if breaker.state == OPEN:
            if now < breaker.until:
                return False
            self._transition(node_id, breaker, HALF_OPEN, now)
        return not breaker.trial

    def acquired(self, node_id: int) -> None:
        """A request was sent to the node; in half-open state it is the one trial."""
        breaker = self.nodes.get(node_id)
        if breaker is not None and breaker.state == HALF_OPEN:
            breaker.trial = True

    def released(self, node_id: int) -> None:
        """The request ended without a verdict (e.g. the client left): allow another trial."""
        breaker = self.nodes.get(node_id)
        if breaker is not None:
            breaker.trial = False

    def success(self, node_id: int) -> None:
        breaker = self.nodes.get(node_id)
        if breaker is None:
            return
        breaker.failures = 0
        breaker.trial = False
        if breaker.state != CLOSED:
            self._transition(node_id, breaker, CLOSED, time.time())

    def failure(self, node_id: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        breaker = self.nodes.setdefault(node_id, NodeBreaker())
        breaker.failures += 1
        breaker.trial = False
        if breaker.state == HALF_OPEN or (breaker.state == CLOSED and breaker.failures >= self.threshold):
            breaker.until = now + self.cooldown
            self._transition(node_id, breaker, OPEN, now)

    def _transition(self, node_id: int, breaker: NodeBreaker, state: str, now: float) -> None:
        breaker.state = state
        breaker.changed_at = now
        if state == CLOSED:
            breaker.failures = 0
        self._track(node_id, state)
        self.pending[node_id] = BreakerRecord(breaker.state, breaker.until, breaker.changed_at)
        if state == OPEN and self.on_open is not None:
            self.on_open(node_id)

    def _track(self, node_id: int, state: str) -> None:
        """Keep ``tripped`` in step with a breaker's new state."""
        if state == CLOSED:
            self.tripped.discard(node_id)
        else:
            self.tripped.add(node_id)

    # -- sharing ------------------------------------------------------------------------------

    def take_pending(self) -> dict[FieldT, EncodableT]:
        """Transitions since the last call, as the Redis hash fields to write."""
        pending, self.pending = self.pending, {}
        return {str(node_id): encode(record) for node_id, record in pending.items()}

    def adopt(self, remote: dict[int, BreakerRecord]) -> None:
        """Apply other workers' transitions that are newer than what this worker knows."""
        for node_id, theirs in remote.items():
            mine = self.nodes.get(node_id)
            if mine is None or theirs.at > mine.changed_at:
                self.nodes[node_id] = NodeBreaker(theirs.state, 0, theirs.until, theirs.at)
                self._track(node_id, theirs.state)
                if theirs.state == OPEN and (mine is None or mine.state != OPEN) and self.on_open is not None:
                    self.on_open(node_id)
