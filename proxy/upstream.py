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

from .httpclient import Pool
from .snapshot import PolicyView

_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()
# The last loop asked for and its session: a web worker has one loop, so ``session()`` is one
# comparison on the hot path instead of a weak-dictionary lookup (cleared by ``close_session``).
_last: tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession] | None = None

# Failures that happen before the engine produced a response; safe to retry on another node.
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
)


def session() -> aiohttp.ClientSession:
    global _last
    loop = asyncio.get_running_loop()
    last = _last
    if last is not None and last[0] is loop and not last[1].closed:
        return last[1]
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
            # Engines set no cookies we would send back: no jar to filter on every request.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        _sessions[loop] = current
    _last = (loop, current)
    return current


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pool] = weakref.WeakKeyDictionary()
_last_pool: Pool | None = None


def engines() -> Pool:
    """This loop's pool of connections to engines, for the attempt loop (``proxy.httpclient``)."""
    global _last_pool
    pool = _last_pool
    loop = asyncio.get_running_loop()
    if pool is not None and pool.loop is loop and not pool.closed:
        return pool
    pool = _pools.get(loop)
    if pool is None or pool.closed:
        pool = _pools[loop] = Pool(loop, settings.ROUTERPANEL_PROXY_MAX_CONNECTIONS)
    _last_pool = pool
    return pool


async def close_session() -> None:
    """Close this loop's session and pool of engine connections (lifespan shutdown, tests)."""
    global _last, _last_pool
    loop = asyncio.get_running_loop()
    pool = _pools.pop(loop, None)
    if pool is not None:
        pool.close()
    if _last_pool is pool:
        _last_pool = None
    current = _sessions.pop(loop, None)
    if _last is not None and _last[0] is loop:
        _last = None
    if current is not None and not current.closed:
        await current.close()


@lru_cache(maxsize=256)
def _timeout(connect: float, total: float) -> aiohttp.ClientTimeout:
    # ``sock_connect`` only costs something when a new connection is opened; aiohttp's ``connect``
    # (which also covers waiting for a pooled connection) would arm a timer on every request.
    return aiohttp.ClientTimeout(total=total, sock_connect=connect)


def timeout_for(policy: PolicyView) -> aiohttp.ClientTimeout:
    """Connect (short) and total (long) timeouts of a policy, for the calls that still use aiohttp
    (the PD clean-ups and side calls); the attempt loop's client takes the two figures itself."""
    return _timeout(policy.connect_timeout, policy.total_timeout)
