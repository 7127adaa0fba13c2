"""API keys' token budgets: the per-minute and per-day token counters every web worker shares, and
reading a key's use (the admin).

The windows are fixed: the Unix minute (``time // 60``) and the UTC day (``time // 86400``). Each
web worker adds the tokens its requests used (``HINCRBY`` on the window's hash, batched by the
worker's loop, ``proxy.budgets``) and reads back the totals of the keys that have a budget, in the
same round trip as the other shared counters (docs/decisions/0005-counters-shared-through-redis.md).
The key names are in ``nodes.live.keys``; the approximation is described in docs/usage.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from . import keys
from .explain import usage_counts, usage_slice
from .usage import add_args

logger = logging.getLogger(__name__)

MINUTE = 60
DAY = 86_400
MINUTE_TTL = 2 * MINUTE  # seconds a minute's hash is kept after the minute began
DAY_TTL = 2 * DAY


def minute_of(now: float) -> int:
    return int(now // MINUTE)


def day_of(now: float) -> int:
    return int(now // DAY)


def seconds_left(now: float, window: int) -> int:
    """Whole seconds (at least 1) until the window of ``window`` seconds that holds ``now`` ends:
    the ``Retry-After`` of a key over its budget in that window."""
    return max(1, window - int(now % window))


def token_counts(usage: bytes) -> tuple[int, int]:
    """Prompt and completion tokens of an answer, from the bytes that hold its ``usage`` object (a
    JSON body, or a stream's usage chunk); a total alone counts as prompt tokens (pooling answers
    give no completion). (0, 0) when it holds no counts. The one reading of usage is
    ``nodes.live.explain``'s (the last ``"usage"`` key on, at most 256 bytes)."""
    counts = usage_counts(usage_slice(usage))
    if counts is None:
        return 0, 0
    prompt, completion, total = counts
    if prompt is None and completion is None:
        return total or 0, 0
    return prompt or 0, completion or 0


def tokens_in(usage: bytes) -> int:
    """Tokens an answer used: prompt + completion (``token_counts``)."""
    prompt, completion = token_counts(usage)
    return prompt + completion


def queue_add(pipe: Any, minute: Mapping[tuple[int, int], int], day: Mapping[tuple[int, int], int]) -> None:
    """Queue adding this worker's tokens, ``(key id, window) -> tokens``, to the windows' hashes (one
    ``EVAL``: ``nodes.live.usage.ADD_SCRIPT``)."""
    flat: list[str | int] = []
    ttls: dict[str, int] = {}
    for windows, key_of, ttl in ((minute, keys.tokens_minute_key, MINUTE_TTL), (day, keys.tokens_day_key, DAY_TTL)):
        for (key_id, window), tokens in windows.items():
            name = key_of(window)
            flat += (name, str(key_id), tokens)
            ttls[name] = ttl
    if flat:
        pipe.eval(*add_args(flat, ttls))


def queue_read(pipe: Any, minute: int, day: int, key_ids: Sequence[int]) -> None:
    """Queue reading the totals of ``key_ids`` in the two windows (two results: ``decode_totals``)."""
    fields = [str(key_id) for key_id in key_ids]
    pipe.hmget(keys.tokens_minute_key(minute), fields)
    pipe.hmget(keys.tokens_day_key(day), fields)


def decode_totals(key_ids: Iterable[int], values: Iterable[bytes | str | None]) -> dict[int, int]:
    """An ``HMGET`` answer as key id -> tokens (keys with none left out)."""
    return {key_id: int(value) for key_id, value in zip(key_ids, values, strict=True) if value is not None}


@dataclass(frozen=True)
class KeyUse:
    """A key's tokens in the current minute and UTC day, and the seconds left in each."""

    minute: int
    day: int
    minute_resets_in: int
    day_resets_in: int


def key_use(client: redis.Redis, key_id: int, now: float) -> KeyUse | None:
    """What the web workers have counted for ``key_id`` so far (up to one flush behind), or None
    when Redis cannot be read."""
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.hget(keys.tokens_minute_key(minute_of(now)), str(key_id))
            pipe.hget(keys.tokens_day_key(day_of(now)), str(key_id))
            minute, day = pipe.execute()
    except redis.RedisError as exc:
        logger.debug("could not read token use from Redis: %s", exc)
        return None
    return KeyUse(
        minute=int(minute or 0),
        day=int(day or 0),
        minute_resets_in=seconds_left(now, MINUTE),
        day_resets_in=seconds_left(now, DAY),
    )
