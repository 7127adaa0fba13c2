"""Clean-up that must finish even when the client leaves: tracked background tasks and KV frees.

Tasks started with ``spawn`` are kept in ``_background`` (a strong reference, so the loop cannot drop
them) and awaited through ``asyncio.shield``: a client that disconnects cancels the request's task,
never the prefill call or the KV free behind it (docs/pd.md, "Nothing leaks").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import aiohttp

from . import metrics as pd_metrics
from .core import Leg, PdRequest

logger = logging.getLogger(__name__)

# A KV free is a tiny call; it gets its own bound so a dead prefill cannot hold a clean-up forever.
FREE_TIMEOUT = 10.0
FREE_ATTEMPTS = 3

_background: set[asyncio.Task] = set()


def spawn(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
    """Run ``coro`` as a task that survives the request's cancellation and is tracked until done."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


def pending_cleanups() -> int:
    """Shielded prefills and KV frees still running (a gauge)."""
    return len(_background)


async def free_kv(pd: PdRequest, leg: Leg, path: str, body: dict[str, Any]) -> None:
    """POST a KV release to the prefill node. Retried only when the connection was refused (the
    engine cannot have seen it), so a release is never sent twice.

    A 200 counts as ``ok``: neither engine says whether it held the id (DLEngine queues the release
    and echoes the ids it was given; LMDeploy answers ``{"status": "SUCCESS"}`` whatever it held)."""
    timeout = min(FREE_TIMEOUT, pd.prefill_timeout)
    for attempt in range(FREE_ATTEMPTS):
        try:
            answer = await pd.post_json(leg, path, body, {"Content-Type": "application/json"}, timeout)
        except aiohttp.ClientOSError as exc:  # no connection was made: the engine cannot have seen it
            if attempt + 1 < FREE_ATTEMPTS:
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            logger.warning("KV release %s%s %s failed: %s", leg.url, path, body, exc)
            pd_metrics.count_free("failed")
            return
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("KV release %s%s %s failed: %s", leg.url, path, body, exc)
            pd_metrics.count_free("failed")
            return
        if answer.status != 200:
            logger.warning("KV release %s%s %s: %s %s", leg.url, path, body, answer.status, answer.message())
            pd_metrics.count_free("failed")
        else:
            pd_metrics.count_free("ok")
        return
