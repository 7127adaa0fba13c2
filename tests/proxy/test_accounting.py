"""Usage accounting on the data path: each request that ends is counted per key, model and node in
this worker's minute, its tokens for the key's budgets too, and the loop adds the minutes to Redis."""

from __future__ import annotations

import time

import pytest
import redis
import redis.asyncio as aioredis

from nodes.live import keys
from nodes.live import usage as live
from proxy import snapshot as snapshots
from proxy.accounting import Accounting
from proxy.budgets import TokenBudgets
from proxy.request import Outcome
from proxy.snapshot import KeyView

from .conftest import AUTH, call, make_snapshot

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


async def test_requests_refused_before_an_engine_are_errors_of_their_key(proxy_app) -> None:
    """A bad key, an unknown model, a model the key may not use and a key over its token budget:
    each is a request and an error of the key that sent it (0: none recognised), under the route's
    name or ``-``, and never under a name only the client made up."""
    keys = {"rp-test-key": {}, "rp-narrow": {"allowed_models": ["other"]}, "rp-spent": {"tokens_per_minute": 1}}
    snap = make_snapshot([{"url": "http://127.0.0.1:9", "models": ["m", "other"]}], keys=keys)
    snapshots.install(snap)
    by_name = {view.name: view for view in snap.keys.values()}
    proxy_app.budgets.add(by_name["key3"].id, 5, time.time())
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    refusals = [
        ({"Authorization": "Bearer nope"}, "m", 401),
        (AUTH, "made-up-name", 404),
        ({"Authorization": "Bearer rp-narrow"}, "m", 403),
        ({"Authorization": "Bearer rp-spent"}, "m", 429),
        (AUTH, 12, 400),
    ]
    for headers, model, status in refusals:
        response = await call(
            proxy_app, "POST", "/v1/chat/completions", json_body={"model": model, **chat}, headers=headers
        )
        assert response.status == status, response.body
    counted = {
        (key_id, model, node): values[2:4] for (_, key_id, model, node), values in proxy_app.accounting.buckets.items()
    }
    assert counted == {
        (0, "-", "-"): [1, 1],  # the bad key
        (1, "-", "-"): [2, 2],  # the unknown model and the malformed one
        (2, "m", "-"): [1, 1],
        (3, "m", "-"): [1, 1],
    }
