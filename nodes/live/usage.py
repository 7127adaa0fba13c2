"""Usage per API key, model and node, per minute: the counters every web worker adds to Redis and
what reads them back (the hourly roll-up into ``UsageHour``, the dashboard's chart).

One hash per minute (``nodes.live.keys.usage_minute_key``), one field per (key, model, node,
counter), added to with ``HINCRBY`` by each worker's loop about once a second
(``proxy.accounting``), expiring after two hours: the roll-up runs well within that. A key id of 0
means a request without a key (``ROUTERPANEL_PROXY_REQUIRE_KEY`` off); the node is the URL that
answered (for a prefill/decode pair, both), "-" when none did. See docs/usage.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import msgpack
import redis

from . import keys

logger = logging.getLogger(__name__)

MINUTE_TTL = 2 * 3600
# The counters of one (key, model, node) in one minute, in this order on the data path.
COUNTERS = ("prompt_tokens", "completion_tokens", "requests", "errors", "ttft_ms_sum", "ttft_count")
Group = tuple[int, str, str]  # key id, model, node


@dataclass
class Counts:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    errors: int = 0
    ttft_ms_sum: int = 0
    ttft_count: int = 0

    def add(self, other: Counts) -> None:
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


assert tuple(f.name for f in fields(Counts)) == COUNTERS


def encode_field(group: Group, counter: str) -> str:
    key_id, model, node = group
    return f"{key_id}\t{model}\t{node}\t{counter}"


# Adds a batch of counts in one call: ARGV[1] a MessagePack array of (hash, field, amount) triples,
# ARGV[2] one of (hash, seconds to live) pairs. One argument each instead of a command per count:
# redis-py spends about 10 µs of the web worker's CPU packing and parsing each command of a pipeline,
# and a flush carries several per (key, model, node). The hashes are named by ``nodes.live.keys``
# (and passed in, not declared as KEYS: RouterPanel runs on one Redis, not a cluster).
ADD_SCRIPT = """
local counts = cmsgpack.unpack(ARGV[1])
for i = 1, #counts, 3 do
  redis.call('HINCRBY', counts[i], counts[i + 1], counts[i + 2])
end
local ttls = cmsgpack.unpack(ARGV[2])
for i = 1, #ttls, 2 do
  redis.call('EXPIRE', ttls[i], ttls[i + 1])
end
return #counts / 3
"""

_packer = msgpack.Packer(use_bin_type=False)  # Redis's Lua MessagePack reads strings, not bin


def add_args(counts: list[str | int], ttls: Mapping[str, int]) -> list[Any]:
    """``EVAL`` arguments adding ``counts`` (flat: hash, field, amount, ...) and setting ``ttls``."""
    flat: list[str | int] = []
    for name, seconds in ttls.items():
        flat += (name, seconds)
    return [ADD_SCRIPT, 0, _packer.pack(counts), _packer.pack(flat)]


def queue_add(pipe: Any, counts: Mapping[tuple[int, int, str, str], list[int]]) -> None:
    """Queue adding one worker's counts, ``(minute, key id, model, node) -> COUNTERS values``."""
    flat: list[str | int] = []
    ttls: dict[str, int] = {}
    for (minute, key_id, model, node), values in counts.items():
        name = keys.usage_minute_key(minute)
        ttls[name] = MINUTE_TTL
        for counter, value in zip(COUNTERS, values, strict=True):
            if value:
                flat += (name, encode_field((key_id, model, node), counter), value)
    if flat:
        pipe.eval(*add_args(flat, ttls))


def decode(raw: Mapping[bytes, bytes]) -> dict[Group, Counts]:
    """One minute's hash as (key id, model, node) -> its counts; malformed fields are skipped."""
    groups: dict[Group, Counts] = {}
    for field, value in raw.items():
        parts = field.decode("utf-8", "replace").rsplit("\t", 3)
        if len(parts) != 4 or parts[3] not in COUNTERS:
            continue
        try:
            group: Group = (int(parts[0]), parts[1], parts[2])
            number = int(value)
        except ValueError:
            continue
        counts = groups.setdefault(group, Counts())
        setattr(counts, parts[3], getattr(counts, parts[3]) + number)
    return groups


def read_minutes(client: redis.Redis, minutes: Iterable[int]) -> dict[int, dict[Group, Counts]] | None:
    """The minutes' counts (one pipelined round trip), or None when Redis cannot be read."""
    wanted = list(minutes)
    try:
        with client.pipeline(transaction=False) as pipe:
            for minute in wanted:
                pipe.hgetall(keys.usage_minute_key(minute))
            raws = pipe.execute()
    except redis.RedisError as exc:
        logger.warning("could not read usage from Redis: %s", exc)
        return None
    return {minute: decode(raw) for minute, raw in zip(wanted, raws, strict=True)}
