"""When to probe each node: its own interval, its own phase, a little jitter (pure: the caller
passes the time, so tests drive it with a fake clock).

A thousand nodes on a 5 s interval are 200 probes a second; sent in a burst every 5 s they would
be a thousand at once, with the prober's CPU, its connection pool and the engines' accept queues
all peaking together. So the nodes are spread over the interval: placed together (start-up), node
``k`` of ``n`` sharing an interval gets the phase ``(k + u) / n`` of it (``u`` uniform in [0, 1)),
which keeps any window of the interval at its fair share of probes (nodes new to the prober are
probed at once, or, when many arrive together, spread over the time it takes to probe them at a
bounded rate). Each probe then goes out at
its nominal time plus jitter (``±jitter`` of the interval, drawn anew each time and never
accumulated, so phases do not drift into clusters). A node added later is probed at once.
A slot the prober could not keep (it ran more than an interval behind) is dropped, not made up in
a burst.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Slot:
    """One probe to send: the node and the time it was due (the caller measures its lateness)."""

    node_id: int
    at: float


@dataclass(slots=True)
class _Entry:
    interval: float
    base: float  # the nominal time of the next probe
    generation: int  # entries in the heap with another generation are stale


class Schedule:
    def __init__(self, *, jitter: float = 0.1, rng: random.Random | None = None) -> None:
        if not 0 <= jitter < 0.5:
            raise ValueError("jitter must be in [0, 0.5)")
        self.jitter = jitter
        self.rng = rng or random.Random()
        self._entries: dict[int, _Entry] = {}
        self._heap: list[tuple[float, int, int, int]] = []  # (at, tie-breaker, node id, generation)
        self._counter = itertools.count()

    def __contains__(self, node_id: int) -> bool:
        return node_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def interval(self, node_id: int) -> float:
        return self._entries[node_id].interval

    def place(self, nodes: Iterable[tuple[int, float]], now: float, *, within: float | None = None) -> None:
        """Schedule ``(node id, interval)`` pairs spread evenly over their intervals from ``now``
        (or over ``within`` seconds, when that is shorter)."""
        groups: dict[float, list[int]] = defaultdict(list)
        for node_id, interval in nodes:
            groups[interval].append(node_id)
        for interval, node_ids in groups.items():
            count = len(node_ids)
            span = interval if within is None else min(interval, within)
            for k, node_id in enumerate(sorted(node_ids)):
                phase = (k + self.rng.random()) / count
                self._set(node_id, interval, now + phase * span, first_exact=True)

    def add_now(self, node_id: int, interval: float, now: float) -> None:
        """Probe ``node_id`` at ``now``, then every ``interval``."""
        self._set(node_id, interval, now, first_exact=True)

    def set_interval(self, node_id: int, interval: float, now: float) -> None:
        """Change a node's interval; its next probe comes at most one new interval from ``now``."""
        entry = self._entries[node_id]
        if entry.interval != interval:
            self._set(node_id, interval, min(entry.base, now + interval))

    def remove(self, node_id: int) -> None:
        self._entries.pop(node_id, None)  # its heap entry goes stale and is skipped

    def next_time(self) -> float | None:
        """When the earliest probe is due (None when nothing is scheduled)."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[Slot]:
        """Every probe due at ``now``, each node's next one scheduled."""
        due: list[Slot] = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return due
            at, _, node_id, _ = heapq.heappop(self._heap)
            due.append(Slot(node_id, at))
            entry = self._entries[node_id]
            interval = entry.interval
            base = entry.base + interval
            earliest = base - self.jitter * interval  # the next probe can come no sooner than this
            if earliest <= now:  # behind by most of an interval: drop the missed slots, never burst them
                base += ((now - earliest) // interval + 1) * interval
            self._set(node_id, interval, base)

    def _set(self, node_id: int, interval: float, base: float, *, first_exact: bool = False) -> None:
        previous = self._entries.get(node_id)
        generation = previous.generation + 1 if previous else 0
        self._entries[node_id] = _Entry(interval, base, generation)
        at = base if first_exact else base + (self.rng.random() * 2 - 1) * self.jitter * interval
        heapq.heappush(self._heap, (at, next(self._counter), node_id, generation))

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            _, _, node_id, generation = heap[0]
            entry = self._entries.get(node_id)
            if entry is not None and entry.generation == generation:
                return
            heapq.heappop(heap)
