"""The circuit-breaker hash (``keys.BREAKERS``): its record, its codec, and reading it.

Each web worker's breakers (``proxy.breaker``) queue their transitions; the worker's sync loop
writes them as records here, advancing ``keys.BREAKERS_VERSION`` with each write, and reads the
hash back (adopting records newer than its own) only when that version moved: the same versioned
live state as node health (``nodes.live.health``). The dashboard and the admin read the hash to
show a breaker per node.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from ..choices import BreakerState
from . import keys

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BreakerRecord:
    """A node's breaker as its last transition left it."""

    state: str  # a BreakerState value
    until: float  # wall-clock time an open breaker's cool-down ends
    at: float  # wall-clock time of the transition (the newest wins across workers)


def queue_write(pipe: Any, fields: Mapping[FieldT, EncodableT]) -> None:
    """Queue on a Redis pipeline the write of encoded records (node id -> ``encode(record)``) and the
    version's advance that tells the other workers to read them."""
    pipe.hset(keys.BREAKERS, mapping=dict(fields))
    pipe.incr(keys.BREAKERS_VERSION)


def encode(record: BreakerRecord) -> str:
    return json.dumps({"state": record.state, "until": record.until, "at": record.at})


def decode(raw: bytes | str) -> BreakerRecord | None:
    """The record, or None for a value that is not one."""
    try:
        data = json.loads(raw)
        return BreakerRecord(str(data["state"]), float(data["until"]), float(data["at"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def shown_state(record: BreakerRecord, now: float) -> str:
    """The state to show: an open breaker whose cool-down is over is half-open (its next request
    is the trial)."""
    if record.state == BreakerState.OPEN and record.until <= now:
        return BreakerState.HALF_OPEN.value
    return record.state


def parse_breakers(raw: Mapping[Any, Any], now: float | None = None) -> dict[int, str]:
    """Breaker state per node from the hash's fields; entries that do not parse are left out."""
    now = time.time() if now is None else now
    states: dict[int, str] = {}
    for node_id, value in raw.items():
        record = decode(value)
        if record is None:
            continue
        try:
            states[int(node_id)] = shown_state(record, now)
        except ValueError:
            continue
    return states


def read_breakers_sync(client: redis.Redis) -> dict[int, str] | None:
    """Breaker states from Redis (``redis.Redis``), or None when Redis cannot be read."""
    try:
        return parse_breakers(client.hgetall(keys.BREAKERS))
    except Exception as exc:
        logger.debug("could not read breaker states from Redis: %s", exc)
        return None


async def read_breakers(client: aioredis.Redis) -> dict[int, str] | None:
    """``read_breakers_sync`` for the event loop (``redis.asyncio.Redis``)."""
    try:
        return parse_breakers(await client.hgetall(keys.BREAKERS))
    except Exception as exc:
        logger.debug("could not read breaker states from Redis: %s", exc)
        return None
