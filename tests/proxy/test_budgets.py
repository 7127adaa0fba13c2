"""Token budgets: a key's tokens are counted from the engines' usage, shared by every worker
through Redis, and a key over a budget is refused until its window frees."""

from __future__ import annotations

import time

import pytest
import redis

from nodes.live import budgets as live
from nodes.live import keys
from proxy import snapshot as snapshots
from proxy.budgets import TokenBudgets
from proxy.shared import SharedCounters
from proxy.snapshot import KeyView

from .conftest import make_snapshot

# 12:00:30 on some day: the minute has 30 s left, the day 12 h.
NOON = 20_000 * 86_400 + 12 * 3600 + 30.0
USAGE = b'{"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}'
PER_MINUTE = KeyView(id=1, name="m", allowed_models=frozenset(), tokens_per_minute=20)
PER_DAY = KeyView(id=2, name="d", allowed_models=frozenset(), tokens_per_day=30)


def test_it_counts_prompt_and_completion_tokens_from_the_answers_usage() -> None:
    assert live.tokens_in(USAGE) == 12
    assert live.tokens_in(b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}\n\n') == 7
    assert live.tokens_in(b'{"usage": {"total_tokens": 9}}') == 9
    assert live.tokens_in(b'{"usage": null}') == 0
    assert live.tokens_in(b'{"choices": []}') == 0


def test_a_key_is_refused_after_the_request_that_crossed_its_budget_until_the_minute_ends() -> None:
    budgets = TokenBudgets()
    assert budgets.exceeded(PER_MINUTE, NOON) is None
    budgets.record(PER_MINUTE.id, USAGE, NOON)
    assert budgets.exceeded(PER_MINUTE, NOON + 1) is None  # 12 of 20
    budgets.record(PER_MINUTE.id, USAGE, NOON + 1)  # 24: this one crossed it, and was served
    assert budgets.exceeded(PER_MINUTE, NOON + 2) == ("tokens_per_minute", 28)
    assert budgets.exceeded(PER_MINUTE, NOON + 30) is None  # the next minute
    assert budgets.exceeded(PER_DAY, NOON + 2) is None  # another key's budget is its own


def test_a_day_budget_frees_at_midnight_utc() -> None:
    budgets = TokenBudgets()
    for _ in range(3):
        budgets.record(PER_DAY.id, USAGE, NOON)
    assert budgets.exceeded(PER_DAY, NOON + 3600) == ("tokens_per_day", 11 * 3600 - 30)
    assert budgets.exceeded(PER_DAY, NOON + 12 * 3600) is None


@pytest.fixture
def budgeted_snapshot():
    previous = snapshots.current()
    snap = make_snapshot(
        [{"url": "http://a:1"}],
        keys={"rp-m": {"tokens_per_minute": 20}, "rp-d": {"tokens_per_day": 30}, "rp-free": {}},
    )
    snapshots.install(snap)
    yield {key.name: key for key in snap.keys.values()}
    snapshots.install(previous)


async def test_every_worker_counts_every_workers_tokens(redis_url, budgeted_snapshot) -> None:
    a, b = SharedCounters(redis_url, interval=0.05), SharedCounters(redis_url, interval=0.05)
    key = next(k for k in budgeted_snapshot.values() if k.tokens_per_minute)
    a.budgets.record(key.id, USAGE)
    a.budgets.record(key.id, USAGE)  # 24 tokens on worker a
    assert a.budgets.exceeded(key) is not None
    assert b.budgets.exceeded(key) is None  # b has not heard of them yet
    await a.sync_once()
    await b.sync_once()
    over = b.budgets.exceeded(key)
    assert over is not None and over[0] == "tokens_per_minute" and 1 <= over[1] <= 60
    assert a.budgets.exceeded(key) is not None  # a's flushed counts are in the totals it read back
    assert a.budgets.used(key.id, _now())[0] == 24  # and counted once
    use = live.key_use(redis.Redis.from_url(redis_url), key.id, _now())
    assert use is not None and (use.minute, use.day) == (24, 24)


async def test_counts_a_failed_flush_took_wait_for_the_next(redis_url, budgeted_snapshot) -> None:
    worker = SharedCounters(redis_url, interval=0.05)
    key = next(k for k in budgeted_snapshot.values() if k.tokens_per_minute)
    worker.budgets.record(key.id, USAGE)
    client = redis.Redis.from_url(redis_url)
    client.set(keys.tokens_minute_key(live.minute_of(_now())), "not a hash")  # the HINCRBY fails
    with pytest.raises(redis.ResponseError):
        await worker.sync_once()
    client.delete(keys.tokens_minute_key(live.minute_of(_now())))
    assert worker.budgets.used(key.id, _now())[0] == 12  # still counted
    await worker.sync_once()
    assert client.hget(keys.tokens_minute_key(live.minute_of(_now())), str(key.id)) == b"12"


def _now() -> float:
    return time.time()
