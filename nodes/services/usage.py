"""Rolling the web workers' per-minute usage (Redis, ``nodes.live.usage``) up into ``UsageHour``
rows. Bookkeeping, like a key's last use: no audit record, no configuration version."""

from __future__ import annotations

import datetime
import time
from dataclasses import asdict

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from ..live import usage as live_usage
from ..live.connection import client as redis_client
from ..models import ApiKey, UsageHour

HOUR = 3600
_UNIQUE = ["hour", "key_id", "model", "node"]


def usage_rollup(*, now: float | None = None, hours: int = 2) -> int | None:
    """Sum the minutes of the current hour and the one before (``hours``) into one row per key,
    model, node and hour, and upsert them: a row holds the hour's totals as the minutes stand now,
    so running again (or twice at once) writes the same rows. The minutes expire two hours after
    they began, so the hour before the current one is complete and still readable whenever this
    runs; run it more often than hourly to keep the current hour's rows fresh (beat: every five
    minutes). Returns the rows written, or None when Redis cannot be read."""
    now = time.time() if now is None else now
    current = int(now // HOUR)
    rows: list[UsageHour] = []
    for hour in range(current - hours + 1, current + 1):
        minutes = live_usage.read_minutes(redis_client(), range(hour * 60, hour * 60 + 60))
        if minutes is None:
            return None
        totals: dict[live_usage.Group, live_usage.Counts] = {}
        for groups in minutes.values():
            for group, counts in groups.items():
                totals.setdefault(group, live_usage.Counts()).add(counts)
        start = datetime.datetime.fromtimestamp(hour * HOUR, tz=datetime.UTC)
        rows += [
            UsageHour(hour=start, key_id=key_id, model=model[:255], node=node[:1000], **asdict(counts))
            for (key_id, model, node), counts in totals.items()
        ]
    if not rows:
        return 0
    names = dict(ApiKey.objects.filter(pk__in={row.key_id for row in rows}).values_list("pk", "name"))
    stamp = timezone.now()
    for row in rows:
        row.key_name = names.get(row.key_id, "")
        row.updated_at = stamp
    with transaction.atomic():
        UsageHour.objects.bulk_create(
            rows,
            update_conflicts=True,
            unique_fields=_UNIQUE,
            update_fields=[*live_usage.COUNTERS, "key_name", "updated_at"],
            batch_size=500,
        )
    return len(rows)


def usage_prune(*, now: float | None = None, days: int | None = None) -> int:
    """Delete the ``UsageHour`` rows of hours that began more than ``days`` (by default
    ``ROUTERPANEL_USAGE_RETENTION_DAYS``) before ``now``; returns how many. Beat runs it hourly."""
    now = time.time() if now is None else now
    days = settings.ROUTERPANEL_USAGE_RETENTION_DAYS if days is None else days
    cutoff = datetime.datetime.fromtimestamp(now - days * 86_400, tz=datetime.UTC)
    deleted, _ = UsageHour.objects.filter(hour__lt=cutoff).delete()
    return deleted
