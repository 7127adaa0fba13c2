"""Live per-node statistics for the operator dashboard, shared across web workers through Redis.

Each web process counts, per node, the attempts it sent, the ones that failed (connect errors,
timeouts, 5xx — never 4xx, never a client that left), recent latencies and times to first token.
The hot path pays a couple of dict updates and a deque append (``record``). Once a second a
background task (``StatsPublisher``) writes this worker's snapshot to Redis under
``routerpanel:stats:worker:{id}`` with a short TTL, so a stopped worker's numbers vanish on their
own; ``read_fleet_stats`` merges every live worker's snapshot into per-node figures.

Redis being down never touches a request: the publisher logs once, retries on its next tick, and
the dashboard shows no live numbers meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypedDict

logger = logging.getLogger(__name__)

KEY_PREFIX = "routerpanel:stats:"
WORKERS_KEY = KEY_PREFIX + "workers"  # sorted set: worker key -> time of its last publish
PUBLISH_INTERVAL = 1.0
# A worker's snapshot outlives a few missed publishes, not a stopped worker.
SNAPSHOT_TTL = 5
# Seconds of per-second request/error buckets kept (and charted).
HISTORY_SECONDS = 180
# Latency and TTFT samples kept per node (the newest win); p50 is taken over the last minute.
SAMPLES = 256
SAMPLE_WINDOW = 60.0
# requests/s and error rate are taken over the last few complete seconds.
RATE_WINDOW = 5


class NodeSnapshot(TypedDict):
    """One node's figures as one worker publishes them."""

    inflight: int
    requests: int
    errors: int
    buckets: dict[str, list[int]]  # epoch second -> [requests, errors]
    latency: list[list[float]]  # [epoch seconds, seconds]
    ttft: list[list[float]]


class WorkerSnapshot(TypedDict):
    worker: str
    at: float
    nodes: dict[str, NodeSnapshot]


class NodeFigures(TypedDict):
    """One node's figures merged over every live worker (what the dashboard shows)."""

    inflight: int
    requests: int
    errors: int
    rps: float
    error_rate: float | None
    p50_latency: float | None
    p50_ttft: float | None
    history: list[int]  # requests in each of the last HISTORY_SECONDS complete seconds, oldest first


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
        """This worker's figures per node (JSON-ready); drops buckets older than the history."""
        now = self._clock()
        oldest = int(now) - HISTORY_SECONDS
        recent = now - SAMPLE_WINDOW
        inflight = inflight or {}
        result: dict[str, NodeSnapshot] = {}
        for node_id in self._nodes.keys() | inflight.keys():
            counters = self._nodes.get(node_id)
            if counters is None:
                result[str(node_id)] = NodeSnapshot(
                    inflight=inflight[node_id], requests=0, errors=0, buckets={}, latency=[], ttft=[]
                )
                continue
            for second in [s for s in counters.buckets if s < oldest]:
                del counters.buckets[second]
            if not counters.buckets and node_id not in inflight:
                # Idle for the whole history: forget it, so nodes that left the fleet cost nothing.
                del self._nodes[node_id]
                continue
            result[str(node_id)] = NodeSnapshot(
                inflight=inflight.get(node_id, 0),
                requests=counters.requests,
                errors=counters.errors,
                buckets={str(s): list(b) for s, b in counters.buckets.items()},
                latency=[[t, v] for t, v in counters.latency if t >= recent],
                ttft=[[t, v] for t, v in counters.ttft if t >= recent],
            )
        return result

    def clear(self) -> None:
        self._nodes.clear()


STATS = NodeStats()


def record(node_id: int, *, status: int, elapsed: float | None, ttft: float | None = None, client_gone: bool = False):
    """Count one attempt in this process's ``STATS`` (see ``NodeStats.record``)."""
    STATS.record(node_id, status=status, elapsed=elapsed, ttft=ttft, client_gone=client_gone)


def worker_key(worker_id: str) -> str:
    return f"{KEY_PREFIX}worker:{worker_id}"


def _new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class StatsPublisher:
    """Writes this worker's snapshot to Redis every ``interval`` seconds, on the event loop."""

    def __init__(
        self,
        stats: NodeStats = STATS,
        *,
        inflight: Callable[[], dict[int, int]] | None = None,
        interval: float = PUBLISH_INTERVAL,
        worker_id: str | None = None,
    ) -> None:
        self.stats = stats
        self.inflight = inflight or dict
        self.interval = interval
        self.worker_id = worker_id or _new_worker_id()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.published = 0
        self._task: asyncio.Task | None = None
        self._redis = None
        self._redis_ok = True

    def ensure_started(self) -> None:
        """Start the publishing task on the running loop, unless it already runs there."""
        loop = asyncio.get_running_loop()
        if self.loop is loop and self._task is not None and not self._task.done():
            return
        self.loop = loop
        self._task = loop.create_task(self._run(), name="routerpanel-stats-publisher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.delete(worker_key(self.worker_id))
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None
        self.loop = None

    def payload(self) -> bytes:
        snapshot = WorkerSnapshot(worker=self.worker_id, at=time.time(), nodes=self.stats.snapshot(self.inflight()))
        return json.dumps(snapshot, separators=(",", ":")).encode()

    async def publish(self) -> None:
        """One write: this worker's snapshot (with a TTL) and its entry in the worker index."""
        if self._redis is None:
            import redis.asyncio as aioredis
            from django.conf import settings

            self._redis = aioredis.Redis.from_url(
                settings.ROUTERPANEL_REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5
            )
        key = worker_key(self.worker_id)
        now = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(key, self.payload(), ex=SNAPSHOT_TTL)
            pipe.zadd(WORKERS_KEY, {key: now})
            pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - 60)
            await pipe.execute()
        self.published += 1

    async def _run(self) -> None:
        while True:
            try:
                await self.publish()
                if not self._redis_ok:
                    logger.info("Redis is reachable again; publishing live node statistics")
                self._redis_ok = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or slow: requests never notice, the next tick retries
                if self._redis_ok:
                    logger.warning("could not publish live node statistics to Redis: %s", exc)
                self._redis_ok = False
            await asyncio.sleep(self.interval)


_publisher: StatsPublisher | None = None


def start_publisher(inflight: Callable[[], dict[int, int]]) -> StatsPublisher:
    """Start (once per event loop) the process's publisher; ``inflight`` reads the load tracker."""
    global _publisher
    if _publisher is None:
        _publisher = StatsPublisher(inflight=inflight)
    _publisher.inflight = inflight
    _publisher.ensure_started()
    return _publisher


async def stop_publisher() -> None:
    if _publisher is not None:
        await _publisher.stop()


# -- Reading (dashboard side) -------------------------------------------------------------------


def _p50(samples: Iterable[float]) -> float | None:
    ordered = sorted(samples)
    if not ordered:
        return None
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def merge_snapshots(workers: Iterable[WorkerSnapshot], now: float | None = None) -> dict[int, NodeFigures]:
    """Per-node figures over every worker: counts and in-flight summed, rates over the last
    ``RATE_WINDOW`` complete seconds, medians over the pooled samples of the last minute."""
    now = time.time() if now is None else now
    current = int(now)
    rate_from = current - RATE_WINDOW  # the current second is still filling up: leave it out
    recent = now - SAMPLE_WINDOW
    merged: dict[int, dict] = {}
    for worker in workers:
        for raw_id, node in (worker.get("nodes") or {}).items():
            try:
                node_id = int(raw_id)
            except ValueError:
                continue
            into = merged.setdefault(
                node_id, {"inflight": 0, "requests": 0, "errors": 0, "buckets": {}, "latency": [], "ttft": []}
            )
            into["inflight"] += int(node.get("inflight", 0))
            into["requests"] += int(node.get("requests", 0))
            into["errors"] += int(node.get("errors", 0))
            for second, (requests, errors) in (node.get("buckets") or {}).items():
                bucket = into["buckets"].setdefault(int(second), [0, 0])
                bucket[0] += requests
                bucket[1] += errors
            into["latency"] += [v for t, v in node.get("latency") or () if t >= recent]
            into["ttft"] += [v for t, v in node.get("ttft") or () if t >= recent]
    figures: dict[int, NodeFigures] = {}
    for node_id, data in merged.items():
        buckets = data["buckets"]
        window = [b for s, b in buckets.items() if rate_from <= s < current]
        requests = sum(b[0] for b in window)
        errors = sum(b[1] for b in window)
        history = [buckets[s][0] if s in buckets else 0 for s in range(current - HISTORY_SECONDS, current)]
        figures[node_id] = NodeFigures(
            inflight=data["inflight"],
            requests=data["requests"],
            errors=data["errors"],
            rps=requests / RATE_WINDOW,
            error_rate=(errors / requests) if requests else None,
            p50_latency=_p50(data["latency"]),
            p50_ttft=_p50(data["ttft"]),
            history=history,
        )
    return figures


def _decode(raw: bytes | str | None) -> WorkerSnapshot | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def read_worker_snapshots(client) -> list[WorkerSnapshot]:
    """Every live worker's snapshot from Redis (``client`` is a ``redis.asyncio.Redis``)."""
    keys = await client.zrangebyscore(WORKERS_KEY, time.time() - SNAPSHOT_TTL * 2, "+inf")
    if not keys:
        return []
    return [s for s in map(_decode, await client.mget(keys)) if s is not None]


def read_fleet_stats_sync(client) -> dict[int, NodeFigures] | None:
    """``read_fleet_stats`` for blocking callers (``client`` is a ``redis.Redis``)."""
    try:
        keys = client.zrangebyscore(WORKERS_KEY, time.time() - SNAPSHOT_TTL * 2, "+inf")
        workers = [s for s in map(_decode, client.mget(keys)) if s is not None] if keys else []
        return merge_snapshots(workers)
    except Exception as exc:
        logger.debug("could not read live node statistics from Redis: %s", exc)
        return None


async def read_fleet_stats(client) -> dict[int, NodeFigures] | None:
    """Merged per-node figures from Redis, or None when Redis cannot be read."""
    try:
        return merge_snapshots(await read_worker_snapshots(client))
    except Exception as exc:  # the dashboard shows "no live data" rather than failing
        logger.debug("could not read live node statistics from Redis: %s", exc)
        return None
