"""The change bus: the configuration version published on Redis for every web worker to see.

The version is stored under ``{channel}:version`` (so a worker that starts or reconnects can read
it) and published on ``{channel}`` (so running workers learn of it at once). Redis being down must
never fail a write: the database keeps the version, and the proxy also polls.
"""

from __future__ import annotations

import logging
import threading

import redis
from django.conf import settings

logger = logging.getLogger(__name__)

# When each proxy API key was last used (key id -> Unix time): written by the web workers
# (proxy/shared.py), copied to ApiKey.last_used_at by a periodic task (nodes.tasks.record_key_usage).
KEYS_LAST_USED = "routerpanel:keys-last-used"

_client: redis.Redis | None = None
_client_url: str | None = None
_lock = threading.Lock()


def client() -> redis.Redis:
    """A process-wide Redis client with short timeouts, so a Redis outage costs a write ~1 s at most."""
    global _client, _client_url
    url = settings.ROUTERPANEL_REDIS_URL
    with _lock:
        if _client is None or _client_url != url:
            _client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
            _client_url = url
        return _client


_SET_IF_NEWER = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""


def version_key() -> str:
    return f"{settings.ROUTERPANEL_CONFIG_CHANNEL}:version"


def publish_config_version(version: int) -> bool:
    """Store and publish ``version``; returns False (and logs) when Redis is unreachable."""
    try:
        # Two writers may commit out of order: the stored version only moves forward.
        client().eval(_SET_IF_NEWER, 1, version_key(), version)
        client().publish(settings.ROUTERPANEL_CONFIG_CHANNEL, str(version))
    except redis.RedisError as exc:
        logger.warning("could not publish configuration version %s on Redis: %s", version, exc)
        return False
    return True
