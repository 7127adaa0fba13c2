"""The one registry of the web workers (``keys.WORKERS``), which every reader of their keys lists.

It is a sorted set: worker id -> Unix time of the worker's last turn of its loop
(``proxy.shared.SharedCounters``: the counters every 0.1 s when it shares them, the statistics
about once a second). The other web workers read the members' counters from it, the dashboard their
statistics. What a worker publishes expires on its own (its counters after about two seconds, its
statistics after ``stats.SNAPSHOT_TTL``), so a reader simply finds nothing left of a worker that
died without saying goodbye; each writer drops members not seen for ``HORIZON`` seconds.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis

from . import keys

# Members not seen for this long are dropped. Only clocks more than this far apart between hosts
# could drop a live worker, and then only until its next turn.
HORIZON = 60


def queue_seen(pipe: aioredis.client.Pipeline, worker: str, now: float) -> None:
    """Queue on a pipeline: ``worker`` is alive at ``now``; forget the members not seen for ``HORIZON``."""
    pipe.zadd(keys.WORKERS, {worker: now})
    pipe.zremrangebyscore(keys.WORKERS, "-inf", now - HORIZON)


def names(members: Iterable[object]) -> list[str]:
    """Worker ids from a read of the set (bytes or str, as the client decodes them)."""
    return [m.decode() if isinstance(m, bytes) else str(m) for m in members]
