"""Usage accounting on the data path: each request that ends is counted for its API key, model and
node in this worker's minute buckets (tokens from the engine's usage, requests, errors, time to
first token), and its tokens for the key's budgets (``proxy.budgets``). The worker's loop adds the
buckets to Redis about once a second (``nodes.live.usage``); a Celery task rolls them up into hourly
rows. The hot path parses the usage once and adds to a list in a dict. See docs/usage.md.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from nodes.live import budgets as live_budgets
from nodes.live import usage as live

from .budgets import TokenBudgets
from .request import Outcome
from .snapshot import KeyView

_Bucket = tuple[int, int, str, str]  # minute, key id (0: none), model, node
# Buckets kept while Redis is away: older ones than the roll-up can still read are dropped.
_KEEP_MINUTES = live.MINUTE_TTL // 60


class Accounting:
    """This worker's usage since the last flush."""

    def __init__(self, budgets: TokenBudgets, *, flush_interval: float = 1.0) -> None:
        self.budgets = budgets
        self.flush_interval = flush_interval
        self.buckets: dict[_Bucket, list[int]] = {}
        self._flushed_at = 0.0

    def record(self, key: KeyView | None, model: str, outcome: Outcome, now: float | None = None) -> None:
        """Count a request that was routed and ended (those refused before: ``refused``)."""
        now = time.time() if now is None else now
        prompt, completion = live_budgets.token_counts(outcome.usage) if outcome.usage else (0, 0)
        key_id = 0 if key is None else key.id
        if key is not None and (prompt or completion):
            self.budgets.add(key_id, prompt + completion, now)
        bucket = (int(now // 60), key_id, model, outcome.node)
        values = self.buckets.get(bucket)
        if values is None:
            values = self.buckets[bucket] = [0, 0, 0, 0, 0, 0]  # in the order of live.COUNTERS
        values[0] += prompt
        values[1] += completion
        values[2] += 1
        if outcome.error is not None or outcome.status >= 400:
            values[3] += 1
        if outcome.ttft is not None:
            values[4] += round(outcome.ttft * 1000)
            values[5] += 1

    def refused(self, key: KeyView | None, model: str, now: float | None = None) -> None:
        """Count a request refused before it reached an engine (a bad key, the key's limits or
        budgets, an unknown model, a malformed body) as a request and an error of its key (id 0
        when no key was recognised), ``model`` (``-`` when none is configured by that name) and no
        node (``-``)."""
        now = time.time() if now is None else now
        bucket = (int(now // 60), 0 if key is None else key.id, model, "-")
        values = self.buckets.setdefault(bucket, [0, 0, 0, 0, 0, 0])
        values[2] += 1
        values[3] += 1

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return bool(self.buckets) and now - self._flushed_at >= self.flush_interval

    async def flush(self, client: aioredis.Redis) -> int:
        """Add the buckets to Redis (one pipelined round trip); returns how many. On failure they
        wait for the next flush (those older than Redis keeps minutes are dropped) and it raises."""
        buckets, self.buckets = self.buckets, {}
        self._flushed_at = time.monotonic()
        try:
            async with client.pipeline(transaction=False) as pipe:
                live.queue_add(pipe, buckets)
                await pipe.execute()
        except BaseException:
            oldest = int(time.time() // 60) - _KEEP_MINUTES
            for bucket, values in buckets.items():
                if bucket[0] > oldest:
                    mine = self.buckets.setdefault(bucket, [0] * len(values))
                    for i, value in enumerate(values):
                        mine[i] += value
            raise
        return len(buckets)
