"""Writing the prober's results to Redis: the live state the web workers route by.

One Redis transaction per flush carries, when a state changed, every node's state (with the
version's advance, so a reader never sees the version without the states), and the nodes' records
and probe history. The states are written every ``FULL_REWRITE_EVERY`` seconds in any case, and
after Redis came back, so a Redis that lost its data (restarted without persistence) is whole
again within that time.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..live import health as live_health
from ..live.health import HealthRecord
from .hysteresis import HealthState
from .runner import Pending

FULL_REWRITE_EVERY = 30.0


def queue_flush(pipe: object, pending: Pending, states: Mapping[int, HealthState], *, history: int, full: bool) -> None:
    """Queue one flush's writes on a Redis pipeline opened with ``transaction=True``: ``states``
    (every node the prober knows) when a state changed or ``full`` is due."""
    if pending.transitions or pending.forget or full:
        live_health.queue_states(pipe, {node_id: s.state for node_id, s in states.items()}, forget=pending.forget)
    live_health.queue_records(pipe, pending.records)
    if history:
        for node_id, entry in pending.history:
            live_health.queue_history(pipe, node_id, entry, history)


def seed_from_records(records: Mapping[int, HealthRecord]) -> dict[int, HealthState]:
    """The prober's starting states from the records a previous prober left in Redis: a restart
    keeps every node's state and counters instead of starting them all ``unknown``."""
    return {
        node_id: HealthState(state=r.state, failures=r.failures, successes=r.successes, since=r.since)
        for node_id, r in records.items()
    }
