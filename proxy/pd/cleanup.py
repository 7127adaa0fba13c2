"""Clean-up that must finish even when the client leaves: tracked background tasks and KV frees.

Tasks started with ``spawn`` are kept in ``_background`` (a strong reference, so the loop cannot drop
them) until they end; a client that disconnects cancels the request's task, never the prefill call
or the KV free behind it (docs/pd.md, "Nothing leaks"). ``finish`` waits for them at shutdown.

NanoDeploy's ``/pd/free`` takes a list of ``seq_ids``: ``free_batched`` gathers the releases for one
prefill node over ``FREE_WINDOW`` into one call, so under load a request costs a share of a call
instead of a call of its own, and the request never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import aiohttp

from ..tasks import named_task
from . import metrics as pd_metrics
from .core import Leg, PdRequest

logger = logging.getLogger(__name__)

# A KV free is a tiny call; it gets its own bound so a dead prefill cannot hold a clean-up forever.
FREE_TIMEOUT = 10.0
FREE_ATTEMPTS = 3
# How long the ids for one prefill node are gathered before their /pd/free goes out, and at most how
# many one call names (a longer list starts the next call).
FREE_WINDOW = 0.005
FREE_BATCH_MAX = 256
# How long a worker that shuts down waits for its clean-ups at most.
FINISH_TIMEOUT = 60.0

_background: set[asyncio.Task] = set()


def spawn(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
    """Run ``coro`` as a task that survives the request's cancellation and is tracked until done."""
    task = named_task(asyncio.get_running_loop(), coro, name)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


def pending_cleanups() -> int:
    """Shielded prefills and KV frees (a batch counts once) still running (a gauge)."""
    return len(_background)


async def finish(timeout: float = FINISH_TIMEOUT) -> int:
    """Let every tracked clean-up end (shutdown): the frees still gathering go out now, prefills
    whose clients left are awaited and their KV freed. Returns how many were still running after
    ``timeout`` seconds (each is bounded by its own timeout: a free by ``FREE_TIMEOUT``, a prefill
    by its policy's first-token timeout)."""
    for batch in list(_batches.values()):
        batch.due.set()
    deadline = asyncio.get_running_loop().time() + timeout
    while _background:  # a prefill that ends releases its KV: a new batch task joins the set
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            break
        await asyncio.wait(set(_background), timeout=left)
        for batch in list(_batches.values()):
            batch.due.set()
    return len(_background)


class _Batch:
    """The ids gathered for one prefill node's next ``/pd/free``; ``pd`` is the request whose policy
    bounds the call most tightly."""

    __slots__ = ("due", "ids", "leg", "loop", "path", "pd")

    def __init__(self, pd: PdRequest, leg: Leg, path: str, seq_id: int) -> None:
        self.pd, self.leg, self.path, self.ids = pd, leg, path, [seq_id]
        self.loop = asyncio.get_running_loop()
        self.due = asyncio.Event()  # set: send now (shutdown)


_batches: dict[str, _Batch] = {}  # per prefill node and path, while its window is open


def free_batched(pd: PdRequest, leg: Leg, path: str, seq_id: int) -> None:
    """Release ``seq_id`` on ``leg``'s node in the next ``{"seq_ids": [...]}`` call to ``path``
    (sent within ``FREE_WINDOW``, in a tracked task). Each id joins exactly one call."""
    name = leg.url + path
    batch = _batches.get(name)
    if batch is None or batch.loop is not asyncio.get_running_loop():  # a batch of a closed loop (tests)
        batch = _batches[name] = _Batch(pd, leg, path, seq_id)
        spawn(_send_batch(name, batch), "routerpanel-pd-free")
        return
    batch.ids.append(seq_id)
    if pd.prefill_timeout < batch.pd.prefill_timeout:
        batch.pd = pd
    if len(batch.ids) >= FREE_BATCH_MAX:
        del _batches[name]  # full: later ids start the next call
        batch.due.set()


async def _send_batch(name: str, batch: _Batch) -> None:
    try:
        try:
            async with asyncio.timeout(FREE_WINDOW):
                await batch.due.wait()
        except TimeoutError:
            pass
    finally:
        if _batches.get(name) is batch:
            del _batches[name]  # from here on, ids start the next batch
    await free_kv(batch.pd, batch.leg, batch.path, {"seq_ids": batch.ids}, len(batch.ids))


async def free_kv(pd: PdRequest, leg: Leg, path: str, body: dict[str, Any], releases: int = 1) -> None:
    """POST a KV release (of ``releases`` ids) to the prefill node. Retried only when the connection
    was refused (the engine cannot have seen it), so a release is never sent twice.

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
            pd_metrics.count_free("failed", releases)
            return
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("KV release %s%s %s failed: %s", leg.url, path, body, exc)
            pd_metrics.count_free("failed", releases)
            return
        if answer.status != 200:
            logger.warning("KV release %s%s %s: %s %s", leg.url, path, body, answer.status, answer.message())
            pd_metrics.count_free("failed", releases)
        else:
            pd_metrics.count_free("ok", releases)
        return
