"""Live per-node statistics: this worker's counts, kept on the hot path for the operator dashboard.

Each web process counts, per node, the attempts it sent, the ones that failed (connect errors,
timeouts, 5xx — never 4xx, never a client that left), recent latencies and times to first token.
The hot path pays a couple of dict updates and a deque append (``record``). About once a second the
worker's sync loop (``proxy.shared.SharedCounters``) publishes ``snapshot()`` to Redis; the shape,
the keys and the merge over every worker live in ``nodes.live.stats``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nodes.live.stats import HISTORY_SECONDS, PUBLISHED_SAMPLES, SAMPLE_WINDOW, NodeSnapshot

# Latency and TTFT samples kept per node (the newest win): what a publish sends at most.
SAMPLES = PUBLISHED_SAMPLES


@dataclass(slots=True)
class _NodeCounters:
    requests: int = 0
    errors: int = 0
    buckets: dict[int, list[int]] = field(default_factory=dict)
    latency: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))
    ttft: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))


def is_failure(status: int, elapsed: float | None, client_gone: bool) -> bool:
    """Whether an attempt counts against its node: no answer (connect error, timeout), a 5xx, or
    an answer that broke off. A 4xx is the client's fault or "busy, try elsewhere"; a client that
    left says nothing about the node."""
    if client_gone:
        return False
    if elapsed is not None:
        return status >= 500
    return not 400 <= status < 500


class NodeStats:
    """This process's per-node counters. One event loop per process, so no locking."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._nodes: dict[int, _NodeCounters] = {}
        self._clock = clock

    def record(
        self,
        node_id: int,
        *,
        status: int,
        elapsed: float | None,
        ttft: float | None = None,
        client_gone: bool = False,
    ) -> None:
        """Count one attempt on ``node_id`` (hot path: O(1), no I/O).

        ``status`` is the engine's HTTP status (0 when none arrived), ``elapsed`` the attempt's
        duration when it completed, ``ttft`` the time to its first streamed chunk."""
        counters = self._nodes.get(node_id)
        if counters is None:
            counters = self._nodes[node_id] = _NodeCounters()
        now = self._clock()
        second = int(now)
        bucket = counters.buckets.get(second)
        if bucket is None:
            bucket = counters.buckets[second] = [0, 0]
        bucket[0] += 1
        counters.requests += 1
        if is_failure(status, elapsed, client_gone):
            bucket[1] += 1
            counters.errors += 1
        if elapsed is not None:
            counters.latency.append((now, elapsed))
        if ttft is not None:
            counters.ttft.append((now, ttft))

    def snapshot(self, inflight: dict[int, int] | None = None) -> dict[str, NodeSnapshot]:
        """This worker's figures per node (JSON-ready, in ``nodes.live.stats.NodeSnapshot``'s
        integers-only shape); drops buckets older than the history."""
        now = self._clock()
        oldest = int(now) - HISTORY_SECONDS
        recent = now - SAMPLE_WINDOW
        inflight = inflight or {}
        result: dict[str, NodeSnapshot] = {}
        for node_id in self._nodes.keys() | inflight.keys():
            counters = self._nodes.get(node_id)
            if counters is None:
                result[str(node_id)] = NodeSnapshot(
                    inflight=inflight[node_id],
                    requests=0,
                    errors=0,
                    first=0,
                    counts=[],
                    failures=[],
                    latency_us=[],
                    ttft_us=[],
                )
                continue
            for second in [s for s in counters.buckets if s < oldest]:
                del counters.buckets[second]
            if not counters.buckets and node_id not in inflight:
                # Idle for the whole history: forget it, so nodes that left the fleet cost nothing.
                del self._nodes[node_id]
                continue
            buckets = counters.buckets
            first = min(buckets) if buckets else 0
            counts = [0] * (max(buckets) - first + 1) if buckets else []
            failures = counts.copy()
            for second, (requests, errors) in buckets.items():
                counts[second - first] = requests
                failures[second - first] = errors
            result[str(node_id)] = NodeSnapshot(
                inflight=inflight.get(node_id, 0),
                requests=counters.requests,
                errors=counters.errors,
                first=first,
                counts=counts,
                failures=failures,
                latency_us=[round(v * 1e6) for t, v in counters.latency if t >= recent],
                ttft_us=[round(v * 1e6) for t, v in counters.ttft if t >= recent],
            )
        return result

    def clear(self) -> None:
        self._nodes.clear()


STATS = NodeStats()


def record(
    node_id: int, *, status: int, elapsed: float | None, ttft: float | None = None, client_gone: bool = False
) -> None:
    """Count one attempt in this process's ``STATS`` (see ``NodeStats.record``)."""
    STATS.record(node_id, status=status, elapsed=elapsed, ttft=ttft, client_gone=client_gone)
