"""Active health checks: probe each node's ``GET /health`` with a short timeout, concurrently.

Hysteresis keeps a node from flapping: it turns ``unhealthy`` after N consecutive failures and
``healthy`` again after M consecutive successes (an ``unknown`` node turns healthy on its first
success). A failing node is marked, never deleted (DLRouter deleted nodes, and they flapped
against the registry re-adding them). Only transitions are audited and bump the configuration
version; the per-probe bookkeeping is a plain update, and the recent probe history is a bounded
list per node in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis as redis_lib
from django.conf import settings
from redis.lock import Lock

from .choices import NodeHealth, NodeState
from .live import keys
from .live.connection import client as redis_client
from .models import Node

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

# Pending nodes are probed too: an operator sees a node's health (and its detected engine type)
# before approving it.
PROBED_STATES = (NodeState.ACTIVE, NodeState.PENDING, NodeState.DRAINING)


@dataclass(frozen=True)
class Probe:
    ok: bool
    latency_ms: float
    detail: str


@dataclass
class HealthReport:
    checked: int = 0
    healthy: int = 0
    unhealthy: int = 0
    transitions: list[str] = field(default_factory=list)
    skipped: bool = False
    reason: str = ""


async def probe_one(client: httpx.AsyncClient, url: str) -> Probe:
    import httpx

    started = time.perf_counter()
    try:
        response = await client.get(f"{url}/health")
    except httpx.HTTPError as exc:
        return Probe(False, (time.perf_counter() - started) * 1000, f"{exc.__class__.__name__}: {exc}"[:300])
    latency = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        return Probe(False, latency, f"HTTP {response.status_code}")
    return Probe(True, latency, "OK")


async def probe_all(urls: list[str], *, timeout: float) -> list[Probe]:
    # httpx is imported here, not at the top: web workers load this module (for the admin) but never
    # probe, and httpx with its dependencies costs each of them ~18 MB of memory.
    import httpx

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        return await asyncio.gather(*(probe_one(client, url) for url in urls))


def record_history(results: list[tuple[Node, Probe]]) -> None:
    """Keep the last probes per node in Redis (bounded); a Redis outage only loses history."""
    keep = settings.ROUTERPANEL_HEALTH_HISTORY
    now = time.time()
    try:
        pipe = redis_client().pipeline(transaction=False)
        for node, probe in results:
            entry = {"t": now, "ok": probe.ok, "ms": round(probe.latency_ms, 1), "detail": probe.detail}
            pipe.lpush(keys.health_history_key(node.pk), json.dumps(entry))
            pipe.ltrim(keys.health_history_key(node.pk), 0, keep - 1)
        pipe.execute()
    except redis_lib.RedisError as exc:
        logger.warning("could not record health history: %s", exc)


def recent_history(node_id: int, limit: int = 20) -> list[dict]:
    try:
        raw = redis_client().lrange(keys.health_history_key(node_id), 0, limit - 1)
    except redis_lib.RedisError:
        return []
    return [json.loads(item) for item in raw]


def next_health(node: Node, probe: Probe) -> tuple[str, int, int]:
    """The node's health and consecutive counters after ``probe`` (pure: no I/O)."""
    failures_needed = settings.ROUTERPANEL_HEALTH_FAILURES
    successes_needed = settings.ROUTERPANEL_HEALTH_SUCCESSES
    if probe.ok:
        successes, failures = node.consecutive_successes + 1, 0
        if node.health == NodeHealth.UNKNOWN or successes >= successes_needed:
            return NodeHealth.HEALTHY, failures, successes
        return node.health, failures, successes
    failures, successes = node.consecutive_failures + 1, 0
    if failures >= failures_needed:
        return NodeHealth.UNHEALTHY, failures, successes
    return node.health, failures, successes


def health_lock() -> Lock:
    return redis_client().lock(keys.HEALTH_LOCK, timeout=30, blocking=False)


@contextlib.contextmanager
def single_runner(enabled: bool) -> Iterator[bool]:
    """Hold the health checker's lock (one runner at a time across workers) when ``enabled``."""
    if not enabled:
        yield True
        return
    lock = health_lock()
    try:
        acquired = lock.acquire()
    except redis_lib.RedisError:
        yield True  # without Redis there is no other coordination; probing is harmless
        return
    try:
        yield acquired
    finally:
        if acquired:
            with contextlib.suppress(redis_lib.RedisError):
                lock.release()
