"""The data path's HTTP client: one aiohttp ``ClientSession`` per event loop, created lazily.

aiohttp is used here (and only here) because it costs a fraction of httpx's CPU per request on
this path. Connections are pooled and kept alive; aiohttp sets TCP_NODELAY on them.
Responses are not decompressed (we ask for identity encoding), so bytes pass through unchanged.
"""

from __future__ import annotations

import asyncio
import weakref
from functools import lru_cache

import aiohttp
from django.conf import settings

from .snapshot import PolicyView

_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()

# Failures that happen before the engine produced a response; safe to retry on another node.
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
)


def session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    current = _sessions.get(loop)
    if current is None or current.closed:
        connector = aiohttp.TCPConnector(
            limit=settings.ROUTERPANEL_PROXY_MAX_CONNECTIONS,
            limit_per_host=0,
            ttl_dns_cache=300,
            keepalive_timeout=30,
        )
        current = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(total=None),
            raise_for_status=False,
        )
        _sessions[loop] = current
    return current


async def close_session() -> None:
    """Close this loop's session (lifespan shutdown, tests)."""
    loop = asyncio.get_running_loop()
    current = _sessions.pop(loop, None)
    if current is not None and not current.closed:
        await current.close()


@lru_cache(maxsize=256)
def _timeout(connect: float, total: float) -> aiohttp.ClientTimeout:
    # ``sock_connect`` only costs something when a new connection is opened; aiohttp's ``connect``
    # (which also covers waiting for a pooled connection) would arm a timer on every request.
    return aiohttp.ClientTimeout(total=total, sock_connect=connect)


def timeout_for(policy: PolicyView) -> aiohttp.ClientTimeout:
    """Connect (short) and total (long) timeouts of a policy; the first-token timeout is applied by
    the caller around the wait for headers and the first chunk."""
    return _timeout(policy.connect_timeout, policy.total_timeout)
