"""The data path's connections to engines: one pool per event loop (``proxy.httpclient``), created
lazily, for the attempt loop and the PD side calls alike (docs/decisions/0010-lean-client-for-the-attempt-loop.md).

Connections are pooled and kept alive; bytes pass through unchanged (nothing is decompressed).
"""

from __future__ import annotations

import asyncio
import weakref

import aiohttp
from django.conf import settings

from .httpclient import Pool

# Failures that happen before the engine produced a response; safe to retry on another node.
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
)

_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pool] = weakref.WeakKeyDictionary()
# The last pool handed out: a web worker has one loop, so ``engines()`` is one comparison on the hot
# path instead of a weak-dictionary lookup (cleared by ``close_session``).
_last_pool: Pool | None = None


def engines(loop: asyncio.AbstractEventLoop | None = None) -> Pool:
    """This loop's pool of connections to engines; ``loop``, when given, is the running loop.

    Callers on the hot path pass the loop they already hold: on Python 3.11
    ``asyncio.get_running_loop()`` (and ``asyncio.current_task()`` without a loop) makes a
    ``getpid`` system call each time, to tell a forked child from its parent."""
    global _last_pool
    pool = _last_pool
    if loop is None:
        loop = asyncio.get_running_loop()
    if pool is not None and pool.loop is loop and not pool.closed:
        return pool
    pool = _pools.get(loop)
    if pool is None or pool.closed:
        pool = _pools[loop] = Pool(loop, settings.ROUTERPANEL_PROXY_MAX_CONNECTIONS)
    _last_pool = pool
    return pool


async def close_session() -> None:
    """Close this loop's pool of engine connections (lifespan shutdown, tests)."""
    global _last_pool
    loop = asyncio.get_running_loop()
    pool = _pools.pop(loop, None)
    if pool is not None:
        pool.close()
    if _last_pool is pool:
        _last_pool = None
