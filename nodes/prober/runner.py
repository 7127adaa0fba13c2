"""The prober's core: dispatch probes on schedule, judge their results, keep each node's state.

One event loop, one aiohttp session (``nodes.prober.client``), a bounded number of probes in flight.
Results are not acted on as they arrive: they wait for the next flush (``flush_interval``), where
``nodes.prober.verdicts.judge`` decides what each says (with the loop monitor's account of the
interval in hand), ``nodes.prober.hysteresis.advance`` moves the node's state, and the transitions
and records go out in one Redis transaction (``nodes.prober.publish``). The process around it
(lease, configuration, "probe now", status) is ``nodes.prober.process``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from ..live.health import HealthRecord
from . import client
from .hysteresis import OK, UNKNOWN, VOID, HealthState, advance
from .schedule import Schedule
from .targets import Target
from .verdicts import LATE, LoopLag, ProbeResult, judge

logger = logging.getLogger(__name__)

# Probes due within this many seconds go out together: one wake-up of the loop for a few probes
# instead of one per probe (the schedule's jitter is hundreds of times larger).
DISPATCH_QUANTUM = 0.02
# A node's record is rewritten when what it says changes, and otherwise this often (its ``at`` and
# ``ms`` age meanwhile); its history gets a probe whose result differs from the one before, and
# otherwise one this often. At 1,000 nodes every probe written costs the prober about 1.5% of a core.
RECORD_REFRESH = 10.0
HISTORY_EVERY = 60.0
# Nodes new to the prober (start-up, a registry sync adding hundreds) get their first probe at once,
# spread so that they arrive at no more than this many per second.
FIRST_PROBES_PER_SECOND = 500.0


@dataclass
class Pending:
    """What the next flush publishes."""

    transitions: dict[int, str] = field(default_factory=dict)  # node id -> new state
    records: dict[int, HealthRecord] = field(default_factory=dict)
    history: list[tuple[int, dict]] = field(default_factory=list)
    forget: set[int] = field(default_factory=set)  # deleted nodes
    checked: set[int] = field(default_factory=set)  # nodes probed since the database last heard
    detect: set[int] = field(default_factory=set)  # nodes whose engine type waited for a good probe

    def __bool__(self) -> bool:
        return bool(self.transitions or self.records or self.history or self.forget)


class ProberCore:
    """Probes on schedule and keeps the health state of every node it knows."""

    def __init__(
        self,
        *,
        concurrency: int,
        max_lag: float,
        schedule: Schedule | None = None,
        lag: LoopLag | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.max_lag = max_lag
        self.schedule = schedule or Schedule()
        self.lag = lag or LoopLag()
        self.wall = wall
        self.targets: dict[int, Target] = {}  # scheduled nodes
        self.extra: dict[int, Target] = {}  # nodes probed on request only ("probe now" of a disabled node)
        self.states: dict[int, HealthState] = {}
        self.results: list[ProbeResult] = []  # waiting to be judged
        self.pending = Pending()
        self.counts: Counter[str] = Counter()  # sent, ok, fail, void, late, transitions (and <from>_to_<to>)
        self.session: aiohttp.ClientSession | None = None
        self._semaphore = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._inflight: dict[int, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._written: dict[int, tuple[tuple[str, int, int, str], float]] = {}  # node -> (record gist, at)
        self._logged: dict[int, tuple[str, float]] = {}  # node -> (last history detail, at)
        self._last_sent: dict[int, float] = {}
        self._asked: set[int] = set()  # "probe now": their next result is written whatever it says
        self.periods: deque[float] = deque(maxlen=20_000)  # seconds between two probes of one node
        self.flush_soon = asyncio.Event()  # a "probe now" result wants out before the next flush

    # -- the nodes ------------------------------------------------------------------------------

    def target(self, node_id: int) -> Target | None:
        return self.targets.get(node_id) or self.extra.get(node_id)

    def seed(self, node_id: int, state: HealthState) -> None:
        """The node's state before the prober probed it (from Redis, or the database)."""
        self.states.setdefault(node_id, state)

    def set_targets(self, targets: dict[int, Target], now: float, *, first: bool = False) -> set[int]:
        """Probe ``targets`` from now on; returns the node ids no longer probed. On the ``first``
        call the nodes with a known state are spread over their interval; a node never seen before
        (and on the first call, a node never probed) is probed at once (``FIRST_PROBES_PER_SECOND``)."""
        gone = set(self.targets) - set(targets)
        for node_id in gone:
            self.schedule.remove(node_id)
        spread: list[tuple[int, float]] = []
        new: list[tuple[int, float]] = []
        for node_id, target in targets.items():
            interval = target.probe.interval
            if node_id in self.schedule:
                self.schedule.set_interval(node_id, interval, now)
            elif first and self.states.get(node_id, HealthState()).state != UNKNOWN:
                spread.append((node_id, interval))
            else:
                new.append((node_id, interval))
        self.schedule.place(spread, now)
        self.schedule.place(new, now, within=len(new) / FIRST_PROBES_PER_SECOND)
        self.targets = targets
        self._wake.set()
        return gone

    def probe_now(self, targets: dict[int, Target], now: float) -> None:
        """Probe these nodes at once (scheduled ones keep their interval from now on)."""
        self._asked |= set(targets)
        for node_id, target in targets.items():
            if node_id in self.targets:
                self.schedule.add_now(node_id, self.targets[node_id].probe.interval, now)
            else:
                self.extra[node_id] = target
                self._start(target, now)
        self._wake.set()

    def stand_by(self) -> None:
        """Stop probing and forget every node's state: when this prober takes over again, it starts
        from what the other one left in Redis (``nodes.prober.process.Prober.take_over``)."""
        for node_id in list(self.targets):
            self.schedule.remove(node_id)
        self.targets, self.extra = {}, {}
        self.states.clear()
        self._written.clear()
        self._logged.clear()
        self.results = []
        self.pending = Pending()

    def forget(self, node_ids: set[int]) -> None:
        """Nodes deleted from the registry: drop their state and their live entries."""
        for node_id in node_ids:
            for known in (self.states, self.extra, self._written, self._logged, self._last_sent):
                known.pop(node_id, None)
        self.pending.forget |= node_ids

    # -- dispatching ----------------------------------------------------------------------------

    async def dispatch_forever(self, active: Callable[[], bool]) -> None:
        """Send every probe when it is due (while ``active()``, i.e. this prober holds the lease)."""
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            if active():
                self.dispatch_due(loop.time())
            next_at = self.schedule.next_time()
            # Wake half a quantum early: the loop's timers may fire a millisecond before their time,
            # and a wake-up that finds nothing due is wasted.
            delay = 0.5 if next_at is None or not active() else max(0.0, next_at - DISPATCH_QUANTUM / 2 - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, 0.5)):
                    await self._wake.wait()

    def dispatch_due(self, now: float) -> None:
        for slot in self.schedule.pop_due(now + DISPATCH_QUANTUM):
            target = self.targets.get(slot.node_id)
            if target is None:
                continue
            if now - slot.at > self.max_lag:
                self._late(target, slot.at, now, f"not sent: due {(now - slot.at) * 1000:.0f} ms ago (prober late)")
            elif slot.node_id in self._inflight:
                self._late(target, slot.at, now, "not sent: the previous probe is still running")
            else:
                self._start(target, slot.at)

    def _start(self, target: Target, due: float) -> None:
        if target.node_id in self._inflight:
            return
        task = asyncio.get_running_loop().create_task(self._probe(target, due))
        self._inflight[target.node_id] = task
        node_id = target.node_id

        def forget(_: asyncio.Task[None]) -> None:
            self._inflight.pop(node_id, None)

        task.add_done_callback(forget)

    def _late(self, target: Target, due: float, now: float, detail: str) -> None:
        self.counts["late"] += 1
        self.results.append(ProbeResult(target.node_id, LATE, detail, due, now, now, target.probe.timeout, self.wall()))

    async def _probe(self, target: Target, due: float) -> None:
        loop = asyncio.get_running_loop()
        async with self._semaphore:
            sent = loop.time()
            if sent - due > self.max_lag:  # waited for a free slot too long: the prober is overloaded
                self._late(target, due, sent, f"not sent: waited {(sent - due) * 1000:.0f} ms for a free slot")
                return
            if self.session is None or self.session.closed:
                keepalive = max((t.probe.interval for t in self.targets.values()), default=5.0) * 2 + 5
                self.session = client.new_session(limit=self._concurrency, keepalive=keepalive)
            self.counts["sent"] += 1
            last = self._last_sent.get(target.node_id)
            self._last_sent[target.node_id] = sent
            if last is not None:
                self.periods.append(sent - last)
            kind, detail, latency = await client.probe(self.session, target.url, target.probe.timeout)
            self.results.append(
                ProbeResult(
                    target.node_id, kind, detail, due, sent, loop.time(), target.probe.timeout, self.wall(), latency
                )
            )
        if target.node_id in self.extra:
            self.flush_soon.set()

    # -- judging --------------------------------------------------------------------------------

    def judge_results(self) -> int:
        """Judge every result that can be (see ``verdicts.judge``) and move the nodes' states;
        returns how many were judged. What changed waits in ``pending`` for the flush."""
        waiting: list[ProbeResult] = []
        judged = 0
        for result in self.results:
            target = self.target(result.node_id)
            if target is None:
                continue
            verdict = judge(result, self.lag, max_lag=self.max_lag)
            if verdict is None:
                waiting.append(result)
                continue
            judged += 1
            self._apply(result, target, *verdict)
        self.results = waiting
        return judged

    def _apply(self, result: ProbeResult, target: Target, verdict: str, reason: str) -> None:
        node_id = result.node_id
        before = self.states.get(node_id, HealthState())
        after = advance(
            before, verdict, failures=target.probe.failures, successes=target.probe.successes, now=result.wall
        )
        self.states[node_id] = after
        self.counts[verdict] += 1
        detail = f"void: {reason}" if verdict == VOID else reason
        ms = None if result.latency_ms is None else round(result.latency_ms, 2)
        wall = result.wall
        probe = target.probe
        gist = (after.state, min(after.failures, probe.failures), min(after.successes, probe.successes), detail)
        written = self._written.get(node_id)
        asked = node_id in self._asked
        if asked and verdict != VOID:  # a void answer is written too, but the next probe's is awaited
            self._asked.discard(node_id)
        if asked or written is None or written[0] != gist or wall - written[1] >= RECORD_REFRESH:
            self._written[node_id] = (gist, wall)
            self.pending.records[node_id] = HealthRecord(
                after.state, after.since, after.failures, after.successes, ms, detail, wall
            )
        logged = self._logged.get(node_id)
        if logged is None or logged[0] != detail or wall - logged[1] >= HISTORY_EVERY:
            self._logged[node_id] = (detail, wall)
            ok = None if verdict == VOID else verdict == OK
            self.pending.history.append((node_id, {"t": wall, "ok": ok, "ms": ms, "detail": detail}))
        if verdict != VOID:
            self.pending.checked.add(node_id)
        if verdict == OK and target.detect:
            self.pending.detect.add(node_id)
        if after.state != before.state:
            self.pending.transitions[node_id] = after.state
            self.counts["transitions"] += 1
            self.counts[f"{before.state}_to_{after.state}"] += 1  # which way: unknown_to_healthy is a first pass

    def connections_opened(self) -> int:
        connector = self.session.connector if self.session is not None else None
        return getattr(connector, "opened", 0)

    def period_figures(self) -> dict[str, float]:
        """The time between two probes of one node (p1, median, p99, in seconds), recently."""
        gaps = sorted(self.periods)
        if not gaps:
            return {}
        pick = lambda q: round(gaps[min(len(gaps) - 1, int(len(gaps) * q))], 3)  # noqa: E731
        return {"p1_s": pick(0.01), "p50_s": pick(0.5), "p99_s": pick(0.99)}

    def take_pending(self) -> Pending:
        pending, self.pending = self.pending, Pending()
        log_transitions(pending)
        return pending

    def restore(self, pending: Pending) -> None:
        """A flush failed: keep what it carried for the next one (newer values win)."""
        current = self.pending
        current.transitions = {**pending.transitions, **current.transitions}
        current.records = {**pending.records, **current.records}
        current.history = (pending.history + current.history)[-10_000:]
        current.forget |= pending.forget
        current.checked |= pending.checked
        current.detect |= pending.detect

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        for task in list(self._inflight.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.session is not None:
            await self.session.close()


# Transitions named one by one in the log up to this many per flush; beyond, counted per state.
LOG_EACH_UP_TO = 10


def log_transitions(pending: Pending) -> None:
    transitions = pending.transitions
    if len(transitions) <= LOG_EACH_UP_TO:
        for node_id, state in transitions.items():
            record = pending.records.get(node_id)
            logger.info("node %s is now %s: %s", node_id, state, record.detail if record else "")
        return
    per_state = Counter(transitions.values())
    logger.info(
        "%d nodes changed health: %s", len(transitions), ", ".join(f"{n} now {s}" for s, n in per_state.items())
    )
