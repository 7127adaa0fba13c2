"""Celery tasks. They take ids, exit quietly if the row is gone, and call the services."""

from __future__ import annotations

import logging

from celery import shared_task

from . import services
from .models import ControlPlane

logger = logging.getLogger(__name__)


@shared_task(name="nodes.sync_control_plane", ignore_result=True)
def sync_control_plane(control_plane_id: int) -> dict:
    """Sync one control plane (scheduled by beat, one periodic task per control plane)."""
    if not ControlPlane.objects.filter(pk=control_plane_id, enabled=True).exists():
        logger.info("control plane %s is gone or disabled; nothing to sync", control_plane_id)
        return {"skipped": True}
    result = services.registry_sync(control_plane_id=control_plane_id)
    return {"ok": result.ok, "skipped": result.skipped, "reason": result.reason, **result.counts()}


@shared_task(name="nodes.record_key_usage", ignore_result=True)
def record_key_usage() -> int:
    """Copy the proxy's per-key last-use times into the database (for the admin and the API)."""
    return services.api_key_record_usage()


@shared_task(name="nodes.rollup_usage", ignore_result=True)
def rollup_usage() -> int | None:
    """Roll the web workers' per-minute usage up into hourly rows (the current hour and the one before)."""
    return services.usage_rollup()


@shared_task(name="nodes.prune_usage", ignore_result=True)
def prune_usage() -> int:
    """Delete hourly usage rows older than ``ROUTERPANEL_USAGE_RETENTION_DAYS``."""
    return services.usage_prune()
