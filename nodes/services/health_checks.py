"""Active health checks: probe the nodes and apply the hysteresis (``nodes.health``), auditing transitions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from django.conf import settings
from django.utils import timezone

from .. import engine_detect, health
from ..choices import ChangeVia, NodeHealth
from ..models import Node
from .audit import Actor
from .nodes import node_update

logger = logging.getLogger(__name__)


HEALTH_ACTOR = Actor(label="health-check", via=ChangeVia.SYSTEM)


def health_check_nodes(*, node_ids: Iterable[int] | None = None) -> health.HealthReport:
    """Probe the active, pending and draining nodes (or just ``node_ids``, for "probe now") and
    apply the hysteresis; complete the engine-type detection of nodes that now answer. The periodic
    run holds a Redis lock so only one runner probes at a time."""
    report = health.HealthReport()
    with health.single_runner(enabled=node_ids is None) as acquired:
        if not acquired:
            report.skipped, report.reason = True, "another health check is running"
            logger.info("health check skipped: %s", report.reason)
            return report
        if node_ids is not None:
            nodes = list(Node.objects.filter(pk__in=list(node_ids)))
        else:
            nodes = list(Node.objects.filter(state__in=health.PROBED_STATES))
        if not nodes:
            return report
        probes = asyncio.run(health.probe_all([n.url for n in nodes], timeout=settings.ROUTERPANEL_HEALTH_TIMEOUT))
        now = timezone.now()
        for node, probe in zip(nodes, probes, strict=True):
            new_health, failures, successes = health.next_health(node, probe)
            Node.objects.filter(pk=node.pk).update(
                consecutive_failures=failures, consecutive_successes=successes, last_checked_at=now
            )
            if new_health != node.health:
                node.refresh_from_db()
                node_update(node=node, actor=HEALTH_ACTOR, health=new_health, note=probe.detail[:200])
                report.transitions.append(f"{node.url}: {new_health} ({probe.detail})")
                logger.info("node %s is now %s: %s", node.url, new_health, probe.detail)
            report.checked += 1
            report.healthy += new_health == NodeHealth.HEALTHY
            report.unhealthy += new_health == NodeHealth.UNHEALTHY
        health.record_history(list(zip(nodes, probes, strict=True)))
        for node, probe in zip(nodes, probes, strict=True):
            if probe.ok and engine_detect.detection_pending(node.metadata):
                _complete_detection(node, report)
    return report


def _complete_detection(node: Node, report: health.HealthReport) -> None:
    """The node was added without an engine type while it did not answer (LMDeploy registers
    before it listens): now that it answers, detect its type. (An operator who sets the type by
    hand meanwhile drops the pending mark: ``node_save``.)"""
    node.refresh_from_db()
    if not engine_detect.detection_pending(node.metadata):
        return
    choice = engine_detect.choose_engine_type(
        node.url, fallback=node.engine_type, timeout=settings.ROUTERPANEL_ENGINE_DETECT_TIMEOUT
    )
    if choice.pending:
        return  # answered /health but not /v1/models yet: try again at the next run
    found = {"endpoints": choice.endpoints} if choice.endpoints and not node.endpoints else {}
    node_update(
        node=node,
        actor=HEALTH_ACTOR,
        engine_type=choice.engine_type,
        metadata=engine_detect.with_detection(node.metadata, choice),
        **found,
        note=f"engine type detected: {choice.detection['evidence']}"[:200],
    )
    report.transitions.append(f"{node.url}: engine type {choice.engine_type} ({choice.detection['evidence']})")
    logger.info("node %s is %s: %s", node.url, choice.engine_type, choice.detection["evidence"])
