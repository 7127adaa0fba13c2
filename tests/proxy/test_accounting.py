"""Usage accounting on the data path: each request that ends is counted per key, model and node in
this worker's minute, its tokens for the key's budgets too, and the loop adds the minutes to Redis."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio as aioredis

from nodes.live import keys
from nodes.live import usage as live
from proxy.accounting import Accounting
from proxy.budgets import TokenBudgets
from proxy.request import Outcome
from proxy.snapshot import KeyView

NOW = 1_800_000_000.0
KEY = KeyView(id=3, name="k", allowed_models=frozenset(), tokens_per_minute=100)
USAGE = b'{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}'


def test_a_request_counts_its_tokens_request_error_and_time_to_first_token() -> None:
    accounting = Accounting(TokenBudgets())
    accounting.record(KEY, "m", Outcome(status=200, node="http://a:1", usage=USAGE, ttft=0.25), NOW)
    accounting.record(KEY, "m", Outcome(status=502, node="http://a:1", error="engine_error"), NOW)
    accounting.record(None, "m", Outcome(status=200, node="http://a:1", usage=USAGE), NOW)
    minute = int(NOW // 60)
    assert accounting.buckets == {
        (minute, KEY.id, "m", "http://a:1"): [7, 5, 2, 1, 250, 1],
        (minute, 0, "m", "http://a:1"): [7, 5, 1, 0, 0, 0],
    }
    assert accounting.budgets.used(KEY.id, NOW) == (12, 12)  # the key's tokens, once


async def test_the_loop_adds_every_workers_minutes_to_redis(redis_url: str) -> None:
    a, b = Accounting(TokenBudgets()), Accounting(TokenBudgets())
    a.record(KEY, "m", Outcome(status=200, node="http://a:1", usage=USAGE), NOW)
    b.record(KEY, "m", Outcome(status=200, node="http://a:1", usage=USAGE), NOW)
    client = aioredis.Redis.from_url(redis_url)
    assert a.due() and await a.flush(client) == 1 and await b.flush(client) == 1
    await client.aclose()
    assert not a.buckets and not a.due()
    minutes = live.read_minutes(redis.Redis.from_url(redis_url), [int(NOW // 60)])
    assert minutes is not None
    counts = minutes[int(NOW // 60)][(KEY.id, "m", "http://a:1")]
    assert (counts.prompt_tokens, counts.completion_tokens, counts.requests) == (14, 10, 2)


async def test_a_failed_flush_keeps_the_minutes_for_the_next(redis_url: str) -> None:
    accounting = Accounting(TokenBudgets())
    accounting.record(KEY, "m", Outcome(status=200, node="n", usage=USAGE), NOW)
    broken = aioredis.Redis.from_url(redis_url)
    await broken.set(keys.usage_minute_key(int(NOW // 60)), "not a hash")
    with pytest.raises(redis.ResponseError):
        await accounting.flush(broken)
    await broken.delete(keys.usage_minute_key(int(NOW // 60)))
    await broken.aclose()
    assert accounting.buckets == {(int(NOW // 60), KEY.id, "m", "n"): [7, 5, 1, 0, 0, 0]}
