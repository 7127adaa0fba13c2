"""This web worker's one link to the others through Redis: one identity, one client, one loop.

Load counters and per-key limits are shared by every web worker on every host. The hot path stays
synchronous and O(1): each worker counts its own requests locally and exactly, and the loop (every
``interval``, 0.1 s) publishes those counts to Redis and reads the other workers'. A node's
in-flight count is then "mine now + theirs as of the last sync" — at most one interval old, which
is what ``least_requests``, ``power_of_two`` and the per-node and per-key limits need. If Redis is
unreachable the others' view goes stale after ``stale_after`` and is dropped: each worker keeps
serving on its own counts (the local fallback) until Redis is back. See
docs/decisions/0005-counters-shared-through-redis.md.

The same loop carries the circuit breakers' transitions (``proxy.breaker``), the API keys' last use,
the live node health the prober publishes (``proxy.health``), every ``stats_every``-th tick (about
once a second) this worker's live statistics snapshot for the dashboard (``proxy.stats``), and the
requests' explanations in batches (``proxy.explain``). Breakers and health are versioned hashes:
each tick reads two small counters and a hash only when its counter moved, so a fleet of thousands
of nodes costs nothing while nothing changes. Every key name and codec is in ``nodes.live``; the
per-worker keys expire on their own when a worker dies, and its entry in the registry of workers
(``nodes.live.workers``) is dropped a minute later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from nodes.live import keys
from nodes.live import stats as live_stats
from nodes.live import workers as live_workers
from nodes.live.breakers import BreakerRecord, decode
from nodes.live.breakers import queue_write as queue_breakers

from . import snapshot as snapshots
from .accounting import Accounting
from .breaker import Breakers
from .budgets import TokenBudgets
from .explain import Explainer
from .health import LiveHealth
from .load import KeyLimiter, LocalLoadTracker
from .snapshot import KeyView, NodeView
from .stats import STATS, NodeStats

logger = logging.getLogger(__name__)


class SharedView:
    """The other workers' counts as of the last successful sync (empty while stale)."""

    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self.synced_at = 0.0
        self.load: dict[int, int] = {}
        self.keys: dict[str, int] = {}

    def fresh(self) -> bool:
        return time.monotonic() - self.synced_at <= self.stale_after


class SharedLoadTracker(LocalLoadTracker):
    """``LocalLoadTracker`` whose in-flight counts include the other workers' (see module doc)."""

    def __init__(self, view: SharedView) -> None:
        super().__init__()
        self.view = view

    def inflight(self, node_id: int) -> int:
        own = self._inflight.get(node_id, 0)
        return own + self.view.load.get(node_id, 0) if self.view.fresh() else own

    def has_capacity(self, node: NodeView) -> bool:
        return node.max_concurrency == 0 or self.inflight(node.id) < node.max_concurrency

    def try_acquire(self, node: NodeView) -> bool:
        if node.max_concurrency and self.inflight(node.id) >= node.max_concurrency:
            return False
        self._inflight[node.id] = self._inflight.get(node.id, 0) + 1
        if node.max_concurrency:
            self._limited.add(node.id)
        return True

    def limited(self) -> Collection[int]:
        """Also the nodes with requests in flight in other workers (their limits are not known here)."""
        others = self.view.load if self.view.fresh() else None
        return self._limited.union(others) if others else self._limited

    def cluster_counts(self) -> dict[int, int]:
        """In-flight per node across every worker (this one exactly, the others as last synced)."""
        total = dict(self.view.load) if self.view.fresh() else {}
        for node_id, count in self._inflight.items():
            total[node_id] = total.get(node_id, 0) + count
        return total


class SharedKeyLimiter(KeyLimiter):
    """``KeyLimiter`` whose limits count every worker's requests (see module doc)."""

    def __init__(self, view: SharedView) -> None:
        super().__init__()
        self.view = view

    def _others(self, field: str) -> int:
        return self.view.keys.get(field, 0) if self.view.fresh() else 0

    def try_acquire(self, key: KeyView, now: float | None = None) -> str | None:
        active = self._active.get(key.id, 0) + self._others(f"active:{key.id}")
        if key.max_concurrent is not None and active >= key.max_concurrent:
            return "max_concurrent"
        if key.rate_limit_rpm is not None:
            minute = int((time.time() if now is None else now) // 60)
            window, used = self._window.get(key.id, (minute, 0))
            if window != minute:
                used = 0
            if used + self._others(f"rpm:{key.id}:{minute}") >= key.rate_limit_rpm:
                return "rate_limit_rpm"
            self._window[key.id] = (minute, used + 1)
        self._active[key.id] = self._active.get(key.id, 0) + 1
        return None

    def retry_after(self, now: float | None = None) -> int:
        """Seconds until the current one-minute window ends."""
        now = time.time() if now is None else now
        return max(1, 60 - int(now % 60))

    def fields(self) -> dict[FieldT, EncodableT]:
        values: dict[FieldT, EncodableT] = {f"active:{key_id}": count for key_id, count in self._active.items()}
        for key_id, (minute, used) in self._window.items():
            values[f"rpm:{key_id}:{minute}"] = used
        return values


class SharedCounters:
    """Owns this worker's identity, its Redis client and its one background loop, and the shared
    view with the tracker and limiter built on it.

    ``share_counters`` False (a test with its own router or limiter, or
    ``ROUTERPANEL_PROXY_SHARED_COUNTERS`` off) keeps the counters local: the loop then only
    publishes the statistics, of ``stats`` with in-flight counts from ``inflight``.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        interval: float = 0.1,
        stale_after: float = 2.0,
        client_factory: Callable[[], aioredis.Redis] | None = None,
        breakers: Breakers | None = None,
        share_counters: bool = True,
        stats: NodeStats = STATS,
        inflight: Callable[[], dict[int, int]] | None = None,
        stats_interval: float = live_stats.PUBLISH_INTERVAL,
        worker: str | None = None,
        health: LiveHealth | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.interval = interval
        self.worker = worker or keys.new_worker_id()
        self.share_counters = share_counters
        self.view = SharedView(stale_after)
        self.load = SharedLoadTracker(self.view)
        self.limiter = SharedKeyLimiter(self.view)
        self.breakers = breakers or Breakers()
        self.health = health or LiveHealth()
        self._breakers_version: bytes | None = None  # the breaker hash's version last adopted
        self.key_used: dict[int, float] = {}  # key id -> last use since the previous sync
        self.stats = stats
        self.inflight: Callable[[], dict[int, int]] = inflight or self.load.counts
        self.stats_every = max(1, round(stats_interval / interval))  # ticks between statistics publishes
        self.published = 0  # statistics snapshots written
        self.explainer: Explainer | None = None  # the requests' explanations to flush, when kept
        self.budgets = TokenBudgets()  # the keys' token use, added to Redis and read back each sync
        self.accounting = Accounting(self.budgets)  # usage per key, model and node, flushed about once a second
        self._client_factory = client_factory or (
            lambda: aioredis.Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=0.5)
        )
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False  # see stop()
        self._healthy = True
        self._ticks_to_stats = 1  # the first tick publishes

    def start(self) -> None:
        """Start the loop on the running event loop, unless it already runs."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="routerpanel-worker-sync")

    async def stop(self) -> None:
        """Stop the loop and say goodbye: this worker's counts and statistics leave Redis at once.

        The loop also ends on the flag, not only on the cancellation: on Python 3.11 a cancellation
        that lands as one of redis-py's ``asyncio.wait_for`` writes completes is swallowed (the
        write's result is returned instead), and the loop would tick on with ``stop`` awaiting it."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            if self.accounting.buckets:  # the last requests' usage
                with contextlib.suppress(RedisError, OSError):
                    await self.accounting.flush(self._client)
            while self.explainer is not None and self.explainer.buffer:  # the last requests' explanations
                try:
                    await self.explainer.flush(self._client)
                except (RedisError, OSError):
                    break
            with contextlib.suppress(RedisError, OSError):
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.zrem(keys.WORKERS, self.worker)
                    pipe.delete(
                        keys.worker_load_key(self.worker),
                        keys.worker_keys_key(self.worker),
                        keys.stats_worker_key(self.worker),
                    )
                    await pipe.execute()
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()
            self._client = None

    def client(self) -> aioredis.Redis:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.tick()
                if not self._healthy:
                    logger.info("Redis is back; sharing counters and statistics with the other workers again")
                self._healthy = True
                await asyncio.sleep(self.interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or slow: requests never notice, the next tick retries
                if self._healthy:
                    logger.warning("Redis unreachable (%s); using this worker's counts only, no live statistics", exc)
                self._healthy = False
                if self._client is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await self._client.aclose()
                    self._client = None
                await asyncio.sleep(max(self.interval, 0.5))

    async def tick(self) -> None:
        """One turn of the loop: the counters and the live health every time, the statistics every
        ``stats_every``-th (retried on the next tick when it fails)."""
        if self.share_counters:
            health_version = await self.sync_once()
        else:
            self.budgets.forget_before(time.time())  # counted by this worker alone
            health_version = await self.client().get(keys.HEALTH_VERSION)
        await self.health.refresh(self.client(), health_version)
        await self.health.apply_due()
        self._ticks_to_stats -= 1
        if self._ticks_to_stats <= 0:
            await self.publish_stats()
            self._ticks_to_stats = self.stats_every
        while self.explainer is not None and self.explainer.due():  # every full batch (Explainer.due)
            await self.explainer.flush(self.client())
        if self.accounting.due():
            await self.accounting.flush(self.client())

    def stats_payload(self) -> bytes:
        snapshot = live_stats.WorkerSnapshot(
            worker=self.worker, at=time.time(), nodes=self.stats.snapshot(self.inflight())
        )
        return live_stats.encode_snapshot(snapshot)

    async def publish_stats(self) -> None:
        """Write this worker's statistics snapshot (with a TTL) and its turn in the registry of workers."""
        async with self.client().pipeline(transaction=False) as pipe:
            live_stats.queue_publish(pipe, self.worker, self.stats_payload(), time.time())
            await pipe.execute()
        self.published += 1

    async def read_health(self) -> None:
        """Read the live health now and apply it at once (start-up, before the first request)."""
        client = self.client()
        await self.health.refresh(client, await client.get(keys.HEALTH_VERSION))
        await self.health.apply_due(force=True)

    async def sync_once(self) -> bytes | str | None:
        """Publish this worker's counts and read everyone else's (one round trip each way, and one
        more for the breaker hash when its version moved); returns the live health's version."""
        client = self.client()
        ttl_ms = int(max(self.view.stale_after, self.interval * 5) * 1000)
        load_key, keys_key = keys.worker_load_key(self.worker), keys.worker_keys_key(self.worker)
        load: dict[FieldT, EncodableT] = {str(node_id): count for node_id, count in self.load.counts().items()}
        key_counts = self.limiter.fields()
        async with client.pipeline(transaction=False) as pipe:
            pipe.delete(load_key, keys_key)
            if load:
                pipe.hset(load_key, mapping=load)
            if key_counts:
                pipe.hset(keys_key, mapping=key_counts)
            pipe.pexpire(load_key, ttl_ms)
            pipe.pexpire(keys_key, ttl_ms)
            if self.key_used:
                used, self.key_used = self.key_used, {}
                pipe.hset(keys.KEYS_LAST_USED, mapping={str(k): repr(t) for k, t in used.items()})
            transitions = self.breakers.take_pending()
            if transitions:
                queue_breakers(pipe, transitions)
            budgeted = self.budgets.budgeted(snapshots.current())
            windows = self.budgets.queue_flush(pipe, budgeted, time.time())
            budgets_end = len(pipe)
            pipe.get(keys.BREAKERS_VERSION)
            pipe.get(keys.HEALTH_VERSION)
            live_workers.queue_seen(pipe, self.worker, time.time())
            pipe.zrange(keys.WORKERS, 0, -1)
            try:
                results = await pipe.execute()
            except BaseException:
                self.budgets.failed()
                raise
        self.budgets.flushed(windows, budgeted, results[:budgets_end])
        # The two versions, then the two writes of queue_seen, then the list of workers.
        breakers_version, health_version = results[-5] or b"", results[-4]
        if breakers_version != self._breakers_version:
            remote: dict[int, BreakerRecord] = {}
            for node_id, raw in (await client.hgetall(keys.BREAKERS)).items():
                record = decode(raw)
                if record is not None:
                    remote[int(node_id)] = record
            self.breakers.adopt(remote)
            self._breakers_version = breakers_version
        others = [w for w in live_workers.names(results[-1]) if w != self.worker]
        other_load: dict[int, int] = {}
        other_keys: dict[str, int] = {}
        if others:
            # A worker that died without saying goodbye has no hashes left (they expire with ttl_ms).
            async with client.pipeline(transaction=False) as pipe:
                for worker in others:
                    pipe.hgetall(keys.worker_load_key(worker))
                    pipe.hgetall(keys.worker_keys_key(worker))
                results = await pipe.execute()
            for worker_load, worker_keys in zip(results[0::2], results[1::2], strict=True):
                for node_id, count in worker_load.items():
                    other_load[int(node_id)] = other_load.get(int(node_id), 0) + int(count)
                for field, count in worker_keys.items():
                    name = field.decode() if isinstance(field, bytes) else field
                    other_keys[name] = other_keys.get(name, 0) + int(count)
        self.view.load, self.view.keys = other_load, other_keys
        self.view.synced_at = time.monotonic()
        return health_version
