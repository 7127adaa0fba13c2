"""Live per-node statistics shared by the web workers: the snapshot each publishes, and the merge.

Each web worker counts its attempts per node (``proxy.stats``) and, about once a second, writes a
``WorkerSnapshot`` under ``keys.stats_worker_key(worker)`` with a short TTL (so a stopped worker's
numbers vanish on their own) and marks itself seen in the registry of workers (``nodes.live.workers``).
The dashboard reads every registered worker's snapshot and merges them into per-node figures
(``read_fleet_stats``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any, TypedDict, cast

import redis
import redis.asyncio as aioredis

from . import keys, workers
from .connection import json_object

logger = logging.getLogger(__name__)

# How often a worker publishes its snapshot.
PUBLISH_INTERVAL = 1.0
# A worker's snapshot outlives a few missed publishes, not a stopped worker.
SNAPSHOT_TTL = 5
# Seconds of per-second request/error buckets kept (and charted).
HISTORY_SECONDS = 180
# Latency and TTFT medians are taken over the samples of the last minute: each worker's newest
# ``PUBLISHED_SAMPLES`` of it per node, pooled. The publish's size is bounded per node whatever the
# traffic (a worker publishes once a second, on its event loop, for every node it sent requests to).
SAMPLE_WINDOW = 60.0
PUBLISHED_SAMPLES = 32
# requests/s and error rate are taken over the last few complete seconds.
RATE_WINDOW = 5


class NodeSnapshot(TypedDict):
    """One node's figures as one worker publishes them: integers only, in flat lists (a thousand
    busy nodes once encoded 19 MB of float pairs and string-keyed buckets per worker per second,
    and took the worker's loop 1.5 s to encode)."""

    inflight: int
    requests: int
    errors: int
    first: int  # the epoch second of counts[0] and failures[0]
    counts: list[int]  # requests in each second from ``first`` on
    failures: list[int]  # of them, those that failed
    latency_us: list[int]  # the newest samples of the last minute, in microseconds
    ttft_us: list[int]


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


# -- Writing (each web worker) -----------------------------------------------------------------


def encode_snapshot(snapshot: WorkerSnapshot) -> bytes:
    return json.dumps(snapshot, separators=(",", ":")).encode()


def queue_publish(pipe: aioredis.client.Pipeline, worker: str, payload: bytes, now: float) -> None:
    """Queue on a Redis pipeline the writes of one publish: the snapshot with its TTL, and the
    worker's turn in the registry of workers."""
    pipe.set(keys.stats_worker_key(worker), payload, ex=SNAPSHOT_TTL)
    workers.queue_seen(pipe, worker, now)


# -- Reading (the dashboard) -------------------------------------------------------------------


def decode_snapshot(raw: bytes | str | None) -> WorkerSnapshot | None:
    return cast(WorkerSnapshot | None, json_object(raw))  # as encode_snapshot wrote it


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
    merged: dict[int, dict[str, Any]] = {}
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
            _merge_history(into["buckets"], node)
            into["latency"] += [v / 1e6 for v in node.get("latency_us") or ()]
            into["ttft"] += [v / 1e6 for v in node.get("ttft_us") or ()]
            # A worker of the previous release, during a rolling upgrade: [epoch seconds, seconds].
            into["latency"] += [v for t, v in cast(Any, node).get("latency") or () if t >= recent]
            into["ttft"] += [v for t, v in cast(Any, node).get("ttft") or () if t >= recent]
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


def _merge_history(into: dict[int, list[int]], node: NodeSnapshot) -> None:
    """Add ``node``'s per-second [requests, errors] to ``into`` (epoch second -> the pair)."""
    first = int(node.get("first", 0))
    counts, failures = node.get("counts") or (), node.get("failures") or ()
    for offset, (requests, errors) in enumerate(zip(counts, failures, strict=False)):
        if requests or errors:
            bucket = into.setdefault(first + offset, [0, 0])
            bucket[0] += requests
            bucket[1] += errors
    # A worker of the previous release: {"epoch second": [requests, errors]}.
    for second, (requests, errors) in (cast(Any, node).get("buckets") or {}).items():
        bucket = into.setdefault(int(second), [0, 0])
        bucket[0] += requests
        bucket[1] += errors


def _snapshot_keys(members: Iterable[object]) -> list[str]:
    return [keys.stats_worker_key(worker) for worker in workers.names(members)]


def _decode_all(raw: Iterable[bytes | str | None]) -> list[WorkerSnapshot]:
    """The snapshots that are there (a stopped worker's expired; a worker just started has none yet)."""
    return [s for s in map(decode_snapshot, raw) if s is not None]


async def read_worker_snapshots(client: aioredis.Redis) -> list[WorkerSnapshot]:
    """Every registered worker's snapshot from Redis."""
    snapshot_keys = _snapshot_keys(await client.zrange(keys.WORKERS, 0, -1))
    return _decode_all(await client.mget(snapshot_keys)) if snapshot_keys else []


def read_worker_snapshots_sync(client: redis.Redis) -> list[WorkerSnapshot]:
    """``read_worker_snapshots`` for blocking callers."""
    snapshot_keys = _snapshot_keys(client.zrange(keys.WORKERS, 0, -1))
    return _decode_all(client.mget(snapshot_keys)) if snapshot_keys else []


async def read_fleet_stats(client: aioredis.Redis) -> dict[int, NodeFigures] | None:
    """Merged per-node figures from Redis, or None when Redis cannot be read."""
    try:
        return merge_snapshots(await read_worker_snapshots(client))
    except Exception as exc:  # the dashboard shows "no live data" rather than failing
        logger.debug("could not read live node statistics from Redis: %s", exc)
        return None


def read_fleet_stats_sync(client: redis.Redis) -> dict[int, NodeFigures] | None:
    """``read_fleet_stats`` for blocking callers."""
    try:
        return merge_snapshots(read_worker_snapshots_sync(client))
    except Exception as exc:
        logger.debug("could not read live node statistics from Redis: %s", exc)
        return None
