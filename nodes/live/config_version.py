"""The configuration version on Redis, for every web worker to see.

The version is stored under ``keys.config_version_key()`` (so a worker that starts or reconnects
can read it) and published on ``keys.config_channel()`` (so running workers learn of it at once).
Redis being down must never fail a write: the database keeps the version, and the proxy also polls.
See docs/decisions/0003-routing-snapshot-and-config-version.md.
"""

from __future__ import annotations

import logging

import redis

from . import keys
from .connection import client

logger = logging.getLogger(__name__)

_SET_IF_NEWER = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""


def publish_config_version(version: int) -> bool:
    """Store and publish ``version``; returns False (and logs) when Redis is unreachable."""
    try:
        # Two writers may commit out of order: the stored version only moves forward.
        client().eval(_SET_IF_NEWER, 1, keys.config_version_key(), version)
        client().publish(keys.config_channel(), str(version))
    except redis.RedisError as exc:
        logger.warning("could not publish configuration version %s on Redis: %s", version, exc)
        return False
    return True
