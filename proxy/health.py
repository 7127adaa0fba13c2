"""This web worker's copy of the live node health, and when to lay it over the routing snapshot.

The prober publishes node health as live state (``nodes.live.health``): every node's state in one
JSON value and a version counter it advances with every write. The worker's one background loop
(``proxy.shared``) reads the version on every tick and the states only when it moved (``refresh``);
the routes are then
recomputed (``proxy.snapshot.with_health``) at most once per ``apply_interval``, so a burst of
transitions costs one recomputation a second, in a worker thread (at 5,000 nodes serving one model
it takes 7-40 ms of CPU; from a thread the event loop keeps getting its turns), and the hot path
keeps reading plain tuples from the snapshot: no ORM, no Redis, no health lookup per request. A
configuration rebuild applies the states the worker holds before the new snapshot is installed
(``overlay``), so a rebuild never forgets the live health. See docs/decisions/0008-health-as-live-state.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import redis.asyncio as aioredis

from nodes.live import keys
from nodes.live.health import decode_states

from . import snapshot as snapshots
from .snapshot import Snapshot

logger = logging.getLogger(__name__)


class LiveHealth:
    def __init__(self, *, apply_interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.apply_interval = apply_interval
        self.clock = clock
        self.version: bytes | None = None  # the version whose states are held (None: never read)
        self.applied_version: bytes | None = None  # the version whose states the installed routes reflect
        self.states: dict[int, str] = {}
        self.pending = False  # holds states newer than the installed routes
        self.applied_at = float("-inf")
        self.applies = 0  # recomputations of the routes
        self.last_apply_ms = 0.0
        self._executor: ThreadPoolExecutor | None = None
        # Called with every snapshot this installs, on the loop (``Router.eject_unhealthy``: requests
        # waiting on a node that is now unhealthy go elsewhere), as the watcher does for its rebuilds.
        self.on_install: Callable[[Snapshot], object] | None = None

    async def refresh(self, client: aioredis.Redis, version: bytes | str | None) -> bool:
        """Read the states when ``version`` (just read from Redis) is not the one held. They are
        merged over the states held: a Redis that lost its data (restarted without persistence)
        makes a node fall back to nothing older than what this worker last saw, until the prober
        rewrites every state (within 30 s)."""
        # No key yet (b""): a Redis with no prober's writes (or a fresh one).
        version = version.encode() if isinstance(version, str) else version or b""
        if version == self.version:
            return False
        self.states = {**self.states, **decode_states(await client.get(keys.HEALTH_STATES))}
        self.version = version
        self.pending = True
        return True

    def overlay(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` routing by the states held. The watcher calls it on every rebuilt snapshot,
        in its build thread (a rebuild is not counted against ``apply_interval``: it would delay the
        next health change); states read meanwhile stay pending."""
        states, version = self.states, self.version
        started = time.perf_counter()
        result = snapshots.with_health(snapshot, states)
        self.last_apply_ms = (time.perf_counter() - started) * 1000
        self._applied(states, version)
        return result

    def _applied(self, states: dict[int, str], version: bytes | None) -> None:
        if self.states is states:  # nothing newer was read while the routes were recomputed
            self.pending = False
            self.applied_version = version

    def applied(self) -> int | None:
        """The live health version the routes reflect (``GET /health`` shows it), None before any."""
        try:
            return None if self.applied_version is None else int(self.applied_version or 0)
        except ValueError:
            return None

    async def apply_due(self, *, force: bool = False) -> bool:
        """Install the current snapshot with the states held, if they are newer and the last
        recomputation is at least ``apply_interval`` old (or ``force``)."""
        now = self.clock()
        if not self.pending or (not force and now - self.applied_at < self.apply_interval):
            return False
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="routerpanel-health")
        base, states, version = snapshots.current(), self.states, self.version
        started = time.perf_counter()
        result = await asyncio.get_running_loop().run_in_executor(self._executor, snapshots.with_health, base, states)
        self.last_apply_ms = (time.perf_counter() - started) * 1000
        if snapshots.current() is not base:
            return False  # a configuration rebuild was installed meanwhile (with these states, or newer)
        snapshots.install(result)
        if self.on_install is not None:
            self.on_install(result)
        self._applied(states, version)
        self.applied_at = now
        self.applies += 1
        logger.debug("live health applied in %.2f ms (%d states)", self.last_apply_ms, len(states))
        return True
