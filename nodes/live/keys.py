"""Every Redis key and channel shared between RouterPanel's processes, in one place.

Who writes and who reads each one is said next to it. A key naming a worker uses the id from
``new_worker_id``, which each web worker draws once (``proxy.shared.SharedCounters``).
"""

from __future__ import annotations

import os
import socket

from django.conf import settings

# -- Configuration version: the registry services publish, every web worker's watcher reads ------


def config_channel() -> str:
    """Pub/sub channel announcing a new configuration version (``ROUTERPANEL_CONFIG_CHANNEL``)."""
    return settings.ROUTERPANEL_CONFIG_CHANNEL


def config_version_key() -> str:
    """The newest configuration version, for a worker that starts or missed a message."""
    return f"{config_channel()}:version"


# -- Written by the web workers --------------------------------------------------------------

# Hash: node id -> the node's circuit breaker as its last transition left it (``nodes.live.breakers``).
# Every worker writes its transitions and adopts newer ones; the dashboard and the admin read it.
BREAKERS = "routerpanel:breakers"
# Counter: advanced with every write to ``BREAKERS``, so a worker reads the hash only when it moved.
BREAKERS_VERSION = "routerpanel:breakers:version"

# Hash: API key id -> Unix time of its last use; copied to ApiKey.last_used_at by a periodic task
# (``nodes.tasks.record_key_usage``).
KEYS_LAST_USED = "routerpanel:keys-last-used"

# Sorted set: worker id -> Unix time of the worker's last turn; the one registry of the web workers,
# listed by the other workers (their counters) and the dashboard (their statistics). See
# ``nodes.live.workers``.
WORKERS = "routerpanel:workers"


def worker_load_key(worker: str) -> str:
    """Hash: node id -> the worker's requests in flight on that node (with a TTL of about 2 s)."""
    return f"routerpanel:load:{worker}"


def worker_keys_key(worker: str) -> str:
    """Hash: ``active:{key id}`` -> requests in flight, ``rpm:{key id}:{minute}`` -> requests that minute
    (with a TTL of about 2 s)."""
    return f"routerpanel:keys:{worker}"


def stats_worker_key(worker: str) -> str:
    """The worker's statistics snapshot (JSON, with a TTL so a stopped worker's numbers vanish)."""
    return f"routerpanel:stats:worker:{worker}"


# Stream: one entry per proxied request, its explanation (field ``r``: ``nodes.live.explain``'s
# codec), capped by count and age. Every worker's loop appends its requests in batches; the
# dashboard's Requests page, its live tail and ``/api/requests/`` read it.
EXPLAIN = "routerpanel:explain"
# Sorted set: request id -> the millisecond of its entry in EXPLAIN, written and trimmed with it, so
# ``/api/requests/<id>/`` reads one entry instead of scanning the stream.
EXPLAIN_IDS = "routerpanel:explain:ids"


def tokens_minute_key(minute: int) -> str:
    """Hash: API key id -> tokens (prompt + completion) its requests used in that minute (Unix time
    // 60). Every web worker adds its own in batches and reads the totals for the keys with a budget
    (``nodes.live.budgets``); the admin shows them. Expires two minutes after the minute."""
    return f"routerpanel:tokens:minute:{minute}"


def tokens_day_key(day: int) -> str:
    """Hash: API key id -> tokens its requests used in that UTC day (Unix time // 86400); as
    ``tokens_minute_key``, expiring two days after the day began."""
    return f"routerpanel:tokens:day:{day}"


def usage_minute_key(minute: int) -> str:
    """Hash: ``{key id}\t{model}\t{node}\t{counter}`` -> that minute's count (``nodes.live.usage``):
    tokens, requests, errors and time to first token per API key, model and node. Every web worker
    adds its own in batches; a Celery task rolls the minutes up into ``UsageHour`` rows and the
    dashboard charts the last hour. Expires ``nodes.live.usage.MINUTE_TTL`` after the minute."""
    return f"routerpanel:usage:{minute}"


def new_worker_id() -> str:
    """A web worker's identity: host and pid, plus random bytes so a reused pid is a new worker."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


# -- Written by the prober (``manage.py run_prober``; ``nodes.live.health``) -------------------

# String: every node's health state, one JSON object (node id -> ``NodeHealth`` value), written on
# transitions (batched) and now and then in any case. Every web worker reads it when ``HEALTH_VERSION``
# moved and routes by it; see docs/decisions/0008-health-as-live-state.md.
HEALTH_STATES = "routerpanel:health-states"
# Counter: advanced with every write to ``HEALTH_STATES``.
HEALTH_VERSION = "routerpanel:health-states:version"
# Hash: node id -> the node's last probe and hysteresis counters (``nodes.live.health.HealthRecord``);
# read by the admin, the REST API and the dashboard, never by the data path.
HEALTH_RECORDS = "routerpanel:health-records"
# String with a TTL: the running prober's id; a second prober waits until it expires.
PROBER_LEASE = "routerpanel:prober:lease"
# String with a TTL: the prober's own figures (JSON: loop lag, probes sent, late and void probes).
PROBER_STATUS = "routerpanel:prober:status"
# Pub/sub channel: node ids to probe now (JSON list), sent by "probe now" and node registration.
PROBER_CHANNEL = "routerpanel:prober:probe-now"


def health_history_key(node_id: int) -> str:
    """List: the node's most recent probes, newest first (bounded; shown in the admin)."""
    return f"routerpanel:health:{node_id}"


# -- Written by the registry sync (Celery) ----------------------------------------------------


def sync_lock_key(control_plane_id: int) -> str:
    """Lock: one sync of a control plane at a time across every worker and host."""
    return f"routerpanel:sync-lock:{control_plane_id}"
