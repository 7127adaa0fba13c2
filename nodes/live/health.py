"""Node health as live state: the states every web worker routes by, and the probe records behind them.

The prober (``nodes.prober``, ``manage.py run_prober``) is the one writer. It keeps two hashes:

- ``keys.HEALTH_STATES``: every node's ``NodeHealth`` value, as one JSON object (node id -> state).
  Written when a node's state changes (batched, at most every flush interval) and every
  ``FULL_REWRITE_EVERY`` seconds, each time advancing ``keys.HEALTH_VERSION`` in the same
  transaction. A web worker reads the version on every tick of its loop and the object only when
  the version moved (``proxy.health``). One value, not a hash: at 5,000 nodes redis-py took 64-85 ms
  of the worker's event loop to read and parse a hash of 5,000 fields, and takes about 2 ms to read
  and ``json.loads`` the object (bench/snapshot_health.py).
- ``keys.HEALTH_RECORDS``: node id -> ``HealthRecord`` (JSON), the last probe and the hysteresis
  counters, refreshed for the nodes probed since the last flush. The admin, the REST API and the
  dashboard read it; the data path never does.

A node without an entry falls back to ``Node.health`` in the database, which the prober mirrors on
transitions (never audited, never bumping the configuration version). See
docs/decisions/0008-health-as-live-state.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from ..choices import NodeHealth
from . import keys
from .connection import json_object

logger = logging.getLogger(__name__)

_STATES = frozenset(NodeHealth.values)


@dataclass(frozen=True, slots=True)
class HealthRecord:
    """A node's health as the prober last left it."""

    state: str  # a NodeHealth value
    since: float  # wall-clock time the node entered ``state`` (0.0: not known)
    failures: int  # consecutive failed probes
    successes: int  # consecutive successful probes
    ms: float | None  # the last probe's latency, None when it decided nothing or timed out
    detail: str  # the last probe's result: "OK", "HTTP 503", "ConnectionRefusedError: ...", "void: ..."
    at: float  # wall-clock time of the last probe


def encode(record: HealthRecord) -> str:
    return json.dumps(
        {
            "state": record.state,
            "since": record.since,
            "failures": record.failures,
            "successes": record.successes,
            "ms": record.ms,
            "detail": record.detail,
            "at": record.at,
        },
        separators=(",", ":"),
    )


def decode(raw: bytes | str) -> HealthRecord | None:
    """The record, or None for a value that is not one."""
    try:
        data = json.loads(raw)
        state = str(data["state"])
        if state not in _STATES:
            return None
        ms = data.get("ms")
        return HealthRecord(
            state=state,
            since=float(data.get("since") or 0.0),
            failures=int(data.get("failures") or 0),
            successes=int(data.get("successes") or 0),
            ms=None if ms is None else float(ms),
            detail=str(data.get("detail") or ""),
            at=float(data.get("at") or 0.0),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def encode_states(states: Mapping[int, str]) -> str:
    return json.dumps({str(node_id): state for node_id, state in states.items()}, separators=(",", ":"))


def decode_states(raw: bytes | str | None) -> dict[int, str]:
    """``HEALTH_STATES`` as node id -> state; entries that do not parse are left out (and a value
    that is not an object is no states at all)."""
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    try:
        return {int(node_id): state for node_id, state in value.items() if state in _STATES}
    except (ValueError, TypeError):
        return {
            int(node_id): state
            for node_id, state in value.items()
            if isinstance(node_id, str) and node_id.isdigit() and state in _STATES
        }


def parse_records(raw: Mapping[Any, Any]) -> dict[int, HealthRecord]:
    records: dict[int, HealthRecord] = {}
    for node_id, value in raw.items():
        record = decode(value)
        if record is None:
            continue
        try:
            records[int(node_id)] = record
        except ValueError:
            continue
    return records


# -- Writing (the prober; "probe now" when no prober runs) --------------------------------------


def queue_states(pipe: Any, states: Mapping[int, str], *, forget: Iterable[int] = ()) -> None:
    """Queue on a Redis pipeline (``transaction=True``, so readers never see the version without
    the states) the write of every node's state, the removal of ``forget``'s records and the
    version's advance."""
    pipe.set(keys.HEALTH_STATES, encode_states(states))
    fields = [str(node_id) for node_id in forget]
    if fields:
        pipe.hdel(keys.HEALTH_RECORDS, *fields)
    pipe.incr(keys.HEALTH_VERSION)


def merge_states_sync(client: redis.Redis, changes: Mapping[int, str]) -> None:
    """Merge ``changes`` into the states and advance the version (``redis.Redis``), safe against a
    concurrent writer: "probe now" when no prober runs, which may happen twice at once."""
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(keys.HEALTH_STATES)
                states = decode_states(pipe.get(keys.HEALTH_STATES))
                states.update(changes)
                pipe.multi()
                queue_states(pipe, states)
                pipe.execute()
                return
            except redis.WatchError:
                continue


def queue_records(pipe: Any, records: Mapping[int, HealthRecord]) -> None:
    if records:
        pipe.hset(keys.HEALTH_RECORDS, mapping={str(node_id): encode(r) for node_id, r in records.items()})


def queue_history(pipe: Any, node_id: int, entry: Mapping[str, Any], keep: int) -> None:
    """Queue one probe onto the node's bounded history list (the admin's "recent probes")."""
    key = keys.health_history_key(node_id)
    pipe.lpush(key, json.dumps(entry, separators=(",", ":")))
    pipe.ltrim(key, 0, keep - 1)


def request_probe(client: redis.Redis, node_ids: Iterable[int]) -> int:
    """Ask the running prober to probe ``node_ids`` now; returns how many probers heard."""
    return int(client.publish(keys.PROBER_CHANNEL, json.dumps(sorted(set(node_ids)))))


# -- Reading -------------------------------------------------------------------------------------


def read_states_sync(client: redis.Redis) -> dict[int, str] | None:
    """Every live state, or None when Redis cannot be read."""
    try:
        return decode_states(client.get(keys.HEALTH_STATES))
    except Exception as exc:
        logger.debug("could not read node health from Redis: %s", exc)
        return None


def read_records_sync(client: redis.Redis, node_ids: Iterable[int] | None = None) -> dict[int, HealthRecord] | None:
    """Probe records (of ``node_ids``, or all), or None when Redis cannot be read."""
    try:
        if node_ids is None:
            return parse_records(client.hgetall(keys.HEALTH_RECORDS))
        ids = [str(node_id) for node_id in node_ids]
        if not ids:
            return {}
        values = client.hmget(keys.HEALTH_RECORDS, ids)
        return parse_records({node_id: value for node_id, value in zip(ids, values, strict=True) if value is not None})
    except Exception as exc:
        logger.debug("could not read node health records from Redis: %s", exc)
        return None


def recent_history(client: redis.Redis, node_id: int, limit: int = 20) -> list[dict[str, Any]]:
    """The node's latest probes, newest first (empty when Redis cannot be read)."""
    try:
        raw = client.lrange(keys.health_history_key(node_id), 0, limit - 1)
    except redis.RedisError:
        return []
    return [json.loads(item) for item in raw]


def read_prober_status_sync(client: redis.Redis) -> dict[str, Any] | None:
    """The running prober's own figures (``nodes.prober.runner.ProberStatus``), or None."""
    try:
        raw = client.get(keys.PROBER_STATUS)
    except Exception:
        return None
    return json_object(raw)
