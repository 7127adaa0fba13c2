"""The prober process (``manage.py run_prober``): one per deployment, holding a lease in Redis.

Around the core (``nodes.prober.runner``) it runs, on one event loop:

- the loop monitor (``verdicts.LoopLag``), which the verdicts rely on;
- the lease: a second prober (another host's Procfile, say) waits while one holds it, and takes
  over, from the states the first left in Redis, when it expires;
- the node list: reloaded when the configuration version moves (the same channel and key the web
  workers watch), and every ``RELOAD_EVERY`` seconds in any case;
- "probe now" requests on ``keys.PROBER_CHANNEL`` (node registration, the admin, the REST API);
- the flush every ``flush_interval`` (``nodes.prober.publish``) and the database mirror;
- its status (``keys.PROBER_STATUS``): loop lag, probes sent, late and void probes, CPU time.

See docs/decisions/0008-health-as-live-state.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..live import health as live_health
from ..live import keys
from . import publish, targets
from .hysteresis import HealthState
from .runner import ProberCore

logger = logging.getLogger(__name__)

LEASE_TTL = 15.0  # seconds a lease outlives its holder
LEASE_RENEW = 3.0
RELOAD_EVERY = 30.0  # seconds between reloads of the node list when nothing announced a change
VERSION_POLL = 1.0  # seconds between reads of the configuration version (a missed message)
STATUS_EVERY = 1.0
CHECKED_MIRROR_EVERY = 30.0  # seconds between writes of last_checked_at to the database

_LEASE = """
local holder = redis.call('GET', KEYS[1])
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Prober:
    def __init__(
        self,
        redis_url: str,
        *,
        concurrency: int,
        max_lag: float,
        flush_interval: float,
        history: int,
        prober_id: str | None = None,
    ) -> None:
        self.core = ProberCore(concurrency=concurrency, max_lag=max_lag)
        self.flush_interval = flush_interval
        self.history = history
        self.id = prober_id or keys.new_worker_id()
        self.redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=2.0)
        self.leader = False
        self.flushes = 0
        self.last_flush_ms = 0.0
        self._pubsub_url = redis_url
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="routerpanel-prober-db")
        self._reload = asyncio.Event()
        self._config_version: bytes | str | None = None
        self._full_rewrite_at = 0.0  # loop time the states are next written even if none changed
        self._db_transitions: dict[int, str] = {}  # waiting for the database
        self._checked: set[int] = set()
        self._checked_at = 0.0
        self._tasks: list[asyncio.Task] = []

    async def _db(self, func: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, targets.in_thread, func, *args)

    # -- the run --------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        logger.info("prober %s starting", self.id)
        await self._hold_lease()
        if self.leader:
            await self.take_over()
        loops = {
            "monitor": self._monitor(),
            "lease": self._lease_loop(),
            "dispatch": self.core.dispatch_forever(lambda: self.leader),
            "flush": self._flush_loop(),
            "watch": self._watch(),
            "reload": self._reload_loop(),
            "status": self._status_loop(),
        }
        self._tasks = [
            asyncio.create_task(_supervised(name, coro), name=f"routerpanel-prober-{name}")
            for name, coro in loops.items()
        ]
        gc.freeze()  # Django and friends' long-lived objects: keep full collections short
        try:
            await stop.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.core.close()
            self.core.judge_results()
            with contextlib.suppress(RedisError, OSError):
                await self.flush()
            with contextlib.suppress(RedisError, OSError):
                await self.redis.eval(_RELEASE, 1, keys.PROBER_LEASE, self.id)
            with contextlib.suppress(RedisError, OSError):
                await self.redis.aclose()
            self._executor.shutdown(wait=True)
            logger.info("prober %s stopped", self.id)

    async def take_over(self) -> None:
        """Start probing: states from Redis (what a previous prober left), else the database."""
        loaded = await self._db(targets.load_targets)
        await self._seed(loaded)
        self.core.set_targets(loaded, asyncio.get_running_loop().time(), first=True)
        self._full_rewrite_at = 0.0
        logger.info("prober %s probes %d nodes", self.id, len(loaded))

    async def _seed(self, loaded: dict[int, targets.Target]) -> None:
        new = [node_id for node_id in loaded if node_id not in self.core.states]
        if not new:
            return
        records: dict[int, Any] = {}
        with contextlib.suppress(RedisError, OSError):
            values = await self.redis.hmget(keys.HEALTH_RECORDS, [str(node_id) for node_id in new])
            raw = {node_id: value for node_id, value in zip(new, values, strict=True) if value is not None}
            records = live_health.parse_records(raw)
        seeds = publish.seed_from_records(records)
        stored = await self._db(targets.stored_health, [node_id for node_id in new if node_id not in seeds])
        for node_id in new:
            self.core.seed(node_id, seeds.get(node_id) or HealthState(state=stored.get(node_id, "unknown")))

    # -- the lease ------------------------------------------------------------------------------

    async def _hold_lease(self) -> None:
        try:
            held = bool(await self.redis.eval(_LEASE, 1, keys.PROBER_LEASE, self.id, int(LEASE_TTL * 1000)))
        except (RedisError, OSError) as exc:
            # Without Redis there is nothing to coordinate with, and nothing to publish to either:
            # probing keeps the states current for when it returns.
            if not self.leader:
                logger.warning("Redis unreachable (%s); probing without a lease", exc)
            held = True
        if held and not self.leader:
            logger.info("prober %s holds the lease", self.id)
        elif self.leader and not held:
            logger.warning("prober %s lost the lease to another prober; standing by", self.id)
        self.leader = held

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW)
            was_leader = self.leader
            await self._hold_lease()
            if was_leader and not self.leader:
                self.core.stand_by()  # another prober probes now: what this one knows goes stale
            elif self.leader and not was_leader:
                await self.take_over()

    # -- the loop monitor -----------------------------------------------------------------------

    async def _monitor(self) -> None:
        loop = asyncio.get_running_loop()
        lag = self.core.lag
        while True:
            before = loop.time()
            await asyncio.sleep(lag.tick)
            now = loop.time()
            lag.record(now, max(0.0, now - before - lag.tick))

    # -- the node list and "probe now" ------------------------------------------------------------

    async def _watch(self) -> None:
        """Wake a reload when the configuration version is published; take "probe now" requests."""
        while True:
            client = aioredis.Redis.from_url(self._pubsub_url, socket_connect_timeout=0.5)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.config_channel(), keys.PROBER_CHANNEL)
                while True:
                    message = await pubsub.get_message(timeout=VERSION_POLL)
                    if message is None:
                        await self._poll_version()
                        continue
                    channel = message["channel"].decode()
                    if channel == keys.PROBER_CHANNEL:
                        await self.probe_now(_node_ids(message["data"]))
                    else:
                        self._reload.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or the connection dropped: the periodic reload covers
                logger.debug("prober's subscription reconnecting after: %s", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                    await client.aclose()

    async def _poll_version(self) -> None:
        version = await self.redis.get(keys.config_version_key())
        if version != self._config_version:
            self._config_version = version
            self._reload.set()

    async def _reload_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELOAD_EVERY):
                    await self._reload.wait()
            await asyncio.sleep(0.1)  # a burst of changes (a registry sync) is one reload
            self._reload.clear()
            if not self.leader:
                continue
            try:
                await self.reload()
            except Exception:
                logger.exception("could not reload the node list; probing the previous one")

    async def reload(self) -> None:
        loaded = await self._db(targets.load_targets)
        await self._seed(loaded)
        gone = self.core.set_targets(loaded, asyncio.get_running_loop().time())
        if gone:
            deleted = gone - await self._db(targets.existing_ids, gone)
            self.core.forget(deleted)

    async def probe_now(self, node_ids: list[int]) -> None:
        if not node_ids or not self.leader:
            return
        wanted = await self._db(targets.load_targets, node_ids)
        await self._seed(wanted)
        self.core.probe_now(wanted, asyncio.get_running_loop().time())

    # -- flushing -------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_interval):
                    await self.core.flush_soon.wait()
            if self.core.flush_soon.is_set():
                self.core.flush_soon.clear()
                await asyncio.sleep(0.03)  # let the loop monitor vouch for the probe's last moments
            try:
                self.core.judge_results()
                await self.flush()
            except (RedisError, OSError) as exc:
                logger.warning("could not publish node health (%s); retrying", exc)
            except Exception:
                logger.exception("prober flush failed")

    async def flush(self) -> None:
        """Publish what changed since the last flush (and, when due, the whole states hash)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        pending = self.core.take_pending()
        full = self.leader and started >= self._full_rewrite_at
        if pending or full:
            try:
                known = {**self.core.extra, **self.core.targets}
                states = {node_id: s for node_id, s in self.core.states.items() if node_id in known}
                async with self.redis.pipeline(transaction=True) as pipe:
                    publish.queue_flush(pipe, pending, states, history=self.history, full=full)
                    await pipe.execute()
            except BaseException:
                self.core.restore(pending)
                self._full_rewrite_at = 0.0  # Redis may have lost everything: rewrite once it is back
                raise
            if full:
                self._full_rewrite_at = started + publish.FULL_REWRITE_EVERY
        self._db_transitions.update(pending.transitions)
        self._checked |= pending.checked
        await self._mirror(started)
        if pending.detect:
            await self._db(_complete_detections, pending.detect)
        self.flushes += 1
        self.last_flush_ms = (loop.time() - started) * 1000

    async def _mirror(self, now: float) -> None:
        """Copy transitions to the database (and, every ``CHECKED_MIRROR_EVERY``, last_checked_at)."""
        checked: set[int] = set()
        if self._checked and now >= self._checked_at:
            checked, self._checked = self._checked, set()
            self._checked_at = now + CHECKED_MIRROR_EVERY
        if not self._db_transitions and not checked:
            return
        transitions, self._db_transitions = self._db_transitions, {}
        try:
            await self._db(lambda: targets.mirror_health(transitions, checked=checked))
        except Exception as exc:  # the database is busy or away: the live state is what routes
            logger.warning("could not mirror node health to the database (%s); retrying", exc)
            self._db_transitions = {**transitions, **self._db_transitions}
            self._checked |= checked

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        core = self.core
        return {
            "id": self.id,
            "pid": os.getpid(),
            "leader": self.leader,
            "nodes": len(core.targets),
            "inflight": len(core._inflight),
            "loop_lag": core.lag.figures(),
            "period": core.period_figures(),
            "counts": {**core.counts, "connections_opened": core.connections_opened()},
            "flushes": self.flushes,
            "last_flush_ms": round(self.last_flush_ms, 2),
            "cpu_s": round(time.process_time(), 3),
            "at": time.time(),
        }

    async def _status_loop(self) -> None:
        while True:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.set(keys.PROBER_STATUS, json.dumps(self.status()), ex=int(STATUS_EVERY * 5))
            await asyncio.sleep(STATUS_EVERY)


def _complete_detections(node_ids: set[int]) -> None:
    """Nodes whose engine type waited for them to answer, and that now did (``nodes.engine_detect``)."""
    from ..models import Node
    from ..services.health_checks import node_complete_detection

    for node in Node.objects.filter(pk__in=node_ids):
        try:
            node_complete_detection(node=node)
        except Exception:
            logger.exception("could not detect the engine type of node %s", node.pk)


async def _supervised(name: str, coro: Any) -> None:
    """Run one of the prober's loops; a loop that dies is logged loudly (the process then stops
    being useful, and its supervisor restarts it)."""
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.critical("the prober's %s loop failed; stopping", name, exc_info=True)
        os.kill(os.getpid(), signal.SIGTERM)


def _node_ids(raw: bytes | str) -> list[int]:
    """A "probe now" message: a JSON list of node ids (anything else is ignored)."""
    try:
        value = json.loads(raw)
    except ValueError:
        return []
    if not isinstance(value, list):
        return []
    return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
