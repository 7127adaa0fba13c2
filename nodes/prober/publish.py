"""Writing the prober's results: Redis (the live state the web workers route by) and the database.

One Redis transaction per flush carries the transitions (with the version's advance, so a reader
never sees the version without the states), the nodes' records and their probe history. Every
``FULL_REWRITE_EVERY`` seconds, and after Redis came back, the states hash is rewritten whole, so a
Redis that lost its data (restarted without persistence) is whole again within that time.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..live import health as live_health
from ..live.health import HealthRecord
from .hysteresis import HealthState
from .runner import Pending

FULL_REWRITE_EVERY = 30.0


def queue_flush(pipe: object, pending: Pending, *, history: int) -> None:
    """Queue one flush's writes on a Redis pipeline opened with ``transaction=True``."""
    if pending.transitions or pending.forget:
        live_health.queue_states(pipe, pending.transitions, forget=pending.forget)
    live_health.queue_records(pipe, pending.records)
    if history:
        for node_id, entry in pending.history:
            live_health.queue_history(pipe, node_id, entry, history)


def queue_full_rewrite(pipe: object, states: Mapping[int, HealthState]) -> None:
    """Queue the rewrite of the whole states hash (and the version's advance)."""
    live_health.queue_states(pipe, {node_id: s.state for node_id, s in states.items()}, replace=True)


def seed_from_records(records: Mapping[int, HealthRecord]) -> dict[int, HealthState]:
    """The prober's starting states from the records a previous prober left in Redis: a restart
    keeps every node's state and counters instead of starting them all ``unknown``."""
    return {
        node_id: HealthState(state=r.state, failures=r.failures, successes=r.successes, since=r.since)
        for node_id, r in records.items()
    }
