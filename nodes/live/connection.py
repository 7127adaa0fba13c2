"""The process-wide blocking Redis client for Django code (services, tasks, admin, dashboard views).

Short timeouts, so a Redis outage costs a write about a second at most. The web workers' event
loop uses its own ``redis.asyncio`` client (``proxy.shared``).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import redis
from django.conf import settings

_client: redis.Redis | None = None
_client_url: str | None = None
_lock = threading.Lock()


def client() -> redis.Redis:
    """The client for ``ROUTERPANEL_REDIS_URL`` (a new one when the setting changed, as tests do)."""
    global _client, _client_url
    url = settings.ROUTERPANEL_REDIS_URL
    with _lock:
        if _client is None or _client_url != url:
            _client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
            _client_url = url
        return _client


def json_object(raw: bytes | str | None) -> dict[str, Any] | None:
    """A JSON object another process stored, or None when it is missing or not an object."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
