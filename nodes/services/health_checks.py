"""Probing nodes on request: "probe now" (the admin, the REST API) and a node's registration; and
completing the engine-type detection of a node that now answers.

The prober (``nodes.prober``, ``manage.py run_prober``) is the one writer of node health. When one
runs (its lease is in Redis), the request goes to it and this waits for its answer, so the node's
state machine is never advanced by two writers at once. When none runs (a test, a small setup, Redis
away), the nodes are probed here, with the same probe, state machine and writes: the live state in
Redis and the mirror in ``Node.health``. Neither way is audited or bumps the configuration version:
health is live state (docs/decisions/0008-health-as-live-state.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis as redis_lib
from django.conf import settings

from .. import engine_detect
from ..choices import ChangeVia, NodeHealth
from ..live import health as live_health
from ..live import keys
from ..live.connection import client as redis_client
from ..live.health import HealthRecord
from ..models import Node
from ..prober import client as probe_client
from ..prober import targets as prober_targets
from ..prober.hysteresis import FAIL, OK, VOID, HealthState, advance
from ..prober.verdicts import GOOD, OWN
from .audit import Actor
from .nodes import node_update

logger = logging.getLogger(__name__)

# Who completes an engine-type detection in the audit trail (the prober, or "probe now").
HEALTH_ACTOR = Actor(label="health-check", via=ChangeVia.SYSTEM)

# How long to wait for the prober beyond the probes' own timeouts (its flush, a busy moment).
PROBER_GRACE = 2.0


@dataclass
class HealthReport:
    """What probing some nodes now found."""

    checked: int = 0
    healthy: int = 0
    unhealthy: int = 0
    transitions: list[str] = field(default_factory=list)  # "url: state (detail)"
    records: dict[int, HealthRecord] = field(default_factory=dict)


def health_check_nodes(*, node_ids: Iterable[int] | None = None) -> HealthReport:
    """Probe these nodes now, whatever their state (or, without ``node_ids``, every node the prober
    probes on its interval: one round at once), and apply the results to their health."""
    wanted = prober_targets.load_targets(node_ids)
    if not wanted:
        return HealthReport()
    client = redis_client()
    try:
        prober_runs = bool(client.exists(keys.PROBER_LEASE))
    except redis_lib.RedisError:
        prober_runs = False
    if prober_runs:
        report = _through_the_prober(client, wanted)
        if report is not None:
            return report
        logger.warning("the prober did not answer a probe request in time; probing here")
    return _probe_here(client, wanted)


def _report(
    wanted: dict[int, prober_targets.Target], before: dict[int, str], after: dict[int, HealthRecord]
) -> HealthReport:
    report = HealthReport(records=after)
    for node_id, record in after.items():
        report.checked += 1
        report.healthy += record.state == NodeHealth.HEALTHY
        report.unhealthy += record.state == NodeHealth.UNHEALTHY
        if before.get(node_id) != record.state:
            url = wanted[node_id].url.removesuffix("/health")
            report.transitions.append(f"{url}: {record.state} ({record.detail})")
    return report


def _through_the_prober(client: redis_lib.Redis, wanted: dict[int, prober_targets.Target]) -> HealthReport | None:
    """Ask the running prober and wait for its records of these nodes (None when it did not answer)."""
    ids = list(wanted)
    before = live_health.read_records_sync(client, ids) or {}
    asked = time.time()
    try:
        if not live_health.request_probe(client, ids):
            return None  # the lease outlived its prober: nobody listens
    except redis_lib.RedisError:
        return None
    deadline = time.monotonic() + max(t.probe.timeout for t in wanted.values()) + PROBER_GRACE
    while time.monotonic() < deadline:
        time.sleep(0.05)
        records = live_health.read_records_sync(client, ids)
        if records is None:
            return None
        if all(_answered(records.get(node_id), asked) for node_id in ids):
            return _report(wanted, {i: r.state for i, r in before.items()}, records)
    return None


def _answered(record: HealthRecord | None, asked: float) -> bool:
    """A record of a probe made since ``asked`` that decided something (a void one, sent late by a
    busy prober, is followed by another probe soon)."""
    return record is not None and record.at >= asked and not record.detail.startswith("void")


def _probe_here(client: redis_lib.Redis, wanted: dict[int, prober_targets.Target]) -> HealthReport:
    """Probe in this process and write what the prober would have written."""
    ids = list(wanted)
    known = live_health.read_records_sync(client, ids) or {}
    stored = prober_targets.stored_health([i for i in ids if i not in known])
    before = {i: known[i].state if i in known else stored.get(i, NodeHealth.UNKNOWN.value) for i in ids}
    results = asyncio.run(_probe_all(list(wanted.values())))
    now = time.time()
    after: dict[int, HealthRecord] = {}
    transitions: dict[int, str] = {}
    for node_id, (kind, detail, latency) in results.items():
        probe = wanted[node_id].probe
        record = known.get(node_id)
        current = (
            HealthState(record.state, record.failures, record.successes, record.since)
            if record
            else HealthState(state=before[node_id])
        )
        verdict = OK if kind == GOOD else VOID if kind == OWN else FAIL
        state = advance(current, verdict, failures=probe.failures, successes=probe.successes, now=now)
        ms = None if latency is None else round(latency, 2)
        after[node_id] = HealthRecord(state.state, state.since, state.failures, state.successes, ms, detail, now)
        if state.state != before[node_id]:
            transitions[node_id] = state.state
    try:
        if transitions:
            live_health.merge_states_sync(client, transitions)
        with client.pipeline(transaction=True) as pipe:
            live_health.queue_records(pipe, after)
            keep = settings.ROUTERPANEL_HEALTH_HISTORY
            for node_id, record in after.items() if keep else ():
                entry = {"t": now, "ok": record.detail == "OK", "ms": record.ms, "detail": record.detail}
                live_health.queue_history(pipe, node_id, entry, keep)
            pipe.execute()
    except redis_lib.RedisError as exc:  # the database below still records the health
        logger.warning("could not publish node health on Redis: %s", exc)
    prober_targets.mirror_health(transitions, checked=ids)
    report = _report(wanted, before, after)
    for node_id, (kind, _, _) in results.items():
        if kind == GOOD and wanted[node_id].detect:
            detected = node_complete_detection(node=Node.objects.get(pk=node_id))
            if detected:
                report.transitions.append(detected)
    return report


def node_complete_detection(*, node: Node) -> str | None:
    """The node was added without an engine type while it did not answer (LMDeploy registers before
    it listens): now that it answers, detect its type and record it (audited: the engine type is
    configuration). Returns what was found, or None when there was nothing to do or it does not
    say yet. An operator who set the type by hand meanwhile dropped the pending mark (``node_save``)."""
    node.refresh_from_db()
    if not engine_detect.detection_pending(node.metadata):
        return None
    choice = engine_detect.choose_engine_type(
        node.url, fallback=node.engine_type, timeout=settings.ROUTERPANEL_ENGINE_DETECT_TIMEOUT
    )
    if choice.pending:
        return None  # answered /health but not /v1/models yet: the next good probe tries again
    found = {"endpoints": choice.endpoints} if choice.endpoints and not node.endpoints else {}
    node_update(
        node=node,
        actor=HEALTH_ACTOR,
        engine_type=choice.engine_type,
        metadata=engine_detect.with_detection(node.metadata, choice),
        **found,
        note=f"engine type detected: {choice.detection['evidence']}"[:200],
    )
    logger.info("node %s is %s: %s", node.url, choice.engine_type, choice.detection["evidence"])
    return f"{node.url}: engine type {choice.engine_type} ({choice.detection['evidence']})"


async def _probe_all(wanted: list[prober_targets.Target]) -> dict[int, tuple[str, str, float | None]]:
    session = probe_client.new_session(limit=64, keepalive=1.0)
    try:
        results = await asyncio.gather(*(probe_client.probe(session, t.url, t.probe.timeout) for t in wanted))
    finally:
        await session.close()
    return {target.node_id: result for target, result in zip(wanted, results, strict=True)}
