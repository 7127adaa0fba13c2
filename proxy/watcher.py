"""Keeps this process's routing snapshot in step with the configuration version.

Three signals, from fastest to most robust:
1. Redis pub/sub on ``ROUTERPANEL_CONFIG_CHANNEL``: a message wakes the poll loop at once.
2. A cheap poll of the Redis key ``{channel}:version`` every ``ROUTERPANEL_PROXY_VERSION_POLL_INTERVAL``
   (0.25 s), which catches a missed message (subscriber reconnecting, worker just started).
3. A database poll of ``ConfigVersion`` every ``ROUTERPANEL_PROXY_DB_POLL_INTERVAL`` (5 s), or every
   second while Redis is unreachable, so a Redis outage only delays changes.

A rebuild reads the database in a dedicated worker thread (never on the event loop), lays the live
node health over it there (``overlay``: ``proxy.health.LiveHealth.overlay``) and swaps the snapshot
in one assignment. A failed rebuild keeps the previous snapshot and is retried on the
next tick. Health changes never come this way: they are live state, not configuration
(docs/decisions/0008-health-as-live-state.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import redis.asyncio as aioredis
from django.conf import settings
from django.db import connection

from nodes.live.keys import config_channel, config_version_key

from . import snapshot as snapshots

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# While Redis cannot be reached the database is polled this often instead.
DB_POLL_WITHOUT_REDIS = 1.0
# Seconds between attempts after a failed rebuild (the previous snapshot keeps serving meanwhile).
REBUILD_RETRY = 1.0
# Seconds ``stop`` waits for the snapshot thread to finish what a cancelled task had started.
STOP_WAIT = 5.0


def _in_thread(func: Callable[[], _T]) -> Callable[[], _T]:
    """Run a blocking ORM call and close the thread's connection afterwards (CONN_MAX_AGE = 0)."""

    def run() -> _T:
        try:
            return func()
        finally:
            connection.close()

    return run


def _idle() -> None:
    """A job that does nothing: once it has run, every job submitted before it has finished."""


class SnapshotWatcher:
    def __init__(
        self,
        overlay: Callable[[snapshots.Snapshot], snapshots.Snapshot] | None = None,
        on_install: Callable[[snapshots.Snapshot], object] | None = None,
    ) -> None:
        self.overlay = overlay  # applied to every rebuilt snapshot before it is installed
        # Called with every snapshot installed, on the loop (``Router.eject_unhealthy``: requests
        # waiting on a node that is now unhealthy go elsewhere).
        self.on_install = on_install
        # Called in the builder thread with every rebuilt snapshot; what it returns runs on the loop
        # just before the snapshot is installed (``Router.prepare``: the hash rings, built off the loop).
        self.prepare: Callable[[snapshots.Snapshot], Callable[[], None]] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.rebuilds = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="routerpanel-snapshot")
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._start_lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._redis: aioredis.Redis | None = None
        self._last_redis_version: int | None = None
        self._dirty = False
        self._retry_at = 0.0
        # The loops also end on this flag, not only on their cancellation: on Python 3.11 redis-py
        # can swallow a cancellation (see ``proxy.shared.SharedCounters.stop``), and ``stop`` would
        # then wait forever, holding the worker's exit.
        self._stopping = False

    async def ensure_started(self) -> None:
        """Start on the running loop if not already (daphne has no lifespan; uvicorn calls this at start-up)."""
        loop = asyncio.get_running_loop()
        if self.loop is loop:
            return
        if self._start_lock is None or self._lock_loop is not loop:
            self._start_lock, self._lock_loop = asyncio.Lock(), loop
        async with self._start_lock:
            if self.loop is loop:
                return
            await self.start()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopping = False
        self._wake = asyncio.Event()
        self._redis = aioredis.Redis.from_url(
            settings.ROUTERPANEL_REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        await self.refresh("start-up")
        self._tasks = [
            asyncio.create_task(self._poll_loop(), name="routerpanel-snapshot-poll"),
            asyncio.create_task(self._subscribe_loop(), name="routerpanel-snapshot-subscribe"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        # A cancelled task leaves its rebuild or version read running in the snapshot thread: wait,
        # bounded, until the thread is idle (it runs one job at a time, in order), so that its
        # database connection is closed when the worker goes on to exit.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.wrap_future(self._executor.submit(_idle)), STOP_WAIT)
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None
        self.loop = None

    async def refresh(self, reason: str) -> bool:
        """Rebuild the snapshot now; returns False (keeping the old one) if the database failed."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        overlay = self.overlay

        prepare = self.prepare

        def build() -> tuple[snapshots.Snapshot, Callable[[], None] | None]:
            new = snapshots.build_snapshot()
            new = new if overlay is None else overlay(new)
            return new, prepare(new) if prepare is not None else None

        try:
            new, ready = await loop.run_in_executor(self._executor, _in_thread(build))
        except Exception:
            logger.exception(
                "could not rebuild the routing snapshot (%s); keeping version %s", reason, snapshots.current().version
            )
            self._dirty = True
            self._retry_at = time.monotonic() + REBUILD_RETRY
            return False
        if ready is not None:
            ready()
        snapshots.install(new)
        if self.on_install is not None:
            self.on_install(new)
        self._dirty = False
        self.rebuilds += 1
        logger.info(
            "routing snapshot v%s (%s): %d nodes, %d models, %d keys in %.1f ms",
            new.version,
            reason,
            len(new.nodes),
            len(new.routes),
            len(new.keys),
            (time.perf_counter() - started) * 1000,
        )
        return True

    async def _redis_version(self) -> int | None:
        """The version stored in Redis; raises on a Redis error."""
        assert self._redis is not None
        raw = await self._redis.get(config_version_key())
        return int(raw) if raw is not None else None

    async def _db_version(self) -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _in_thread(snapshots.read_version))

    async def _poll_loop(self) -> None:
        interval = settings.ROUTERPANEL_PROXY_VERSION_POLL_INTERVAL
        db_interval = settings.ROUTERPANEL_PROXY_DB_POLL_INTERVAL
        next_db_poll = time.monotonic() + db_interval
        redis_ok = True
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                # A failed rebuild is retried, but not on every tick (the database may be down).
                stale = self._dirty and time.monotonic() >= self._retry_at
                try:
                    version = await self._redis_version()
                    if not redis_ok:
                        logger.info("Redis is reachable again; watching the configuration version there")
                    redis_ok = True
                    # Act on a version we have not seen in Redis yet (compared with what Redis said
                    # last, so a Redis key ahead of a reset database does not rebuild forever).
                    if version is not None and version != self._last_redis_version:
                        self._last_redis_version = version
                        stale = stale or version != snapshots.current().version
                except (aioredis.RedisError, OSError) as exc:
                    if redis_ok:
                        logger.warning("Redis unreachable (%s); polling the database for configuration changes", exc)
                    redis_ok = False
                now = time.monotonic()
                if not stale and now >= next_db_poll:
                    next_db_poll = now + (db_interval if redis_ok else min(db_interval, DB_POLL_WITHOUT_REDIS))
                    stale = await self._db_version() != snapshots.current().version
                if stale:
                    await self.refresh("configuration changed")
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("configuration watcher tick failed")

    async def _subscribe_loop(self) -> None:
        """Wake the poll loop whenever a version is published; reconnect with a short backoff."""
        while not self._stopping:
            pubsub = None
            client = aioredis.Redis.from_url(settings.ROUTERPANEL_REDIS_URL, socket_connect_timeout=0.5)
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(config_channel())
                while not self._stopping:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None:
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or the connection dropped: the polls cover for us
                logger.debug("configuration subscriber reconnecting after: %s", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    if pubsub is not None:
                        await pubsub.aclose()
                    await client.aclose()
