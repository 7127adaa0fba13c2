"""The passive circuit breaker: what counts, open, half-open trial, close; shared across workers."""

from __future__ import annotations

import pytest

from proxy.breaker import CLOSED, HALF_OPEN, OPEN, Breakers
from proxy.shared import SharedCounters


def test_it_opens_after_n_consecutive_failures_and_a_success_resets_the_count() -> None:
    breakers = Breakers(failures=3, cooldown=5)
    breakers.failure(1)
    breakers.failure(1)
    breakers.success(1)
    breakers.failure(1)
    breakers.failure(1)
    assert breakers.state(1) == CLOSED and breakers.allows(1)
    breakers.failure(1)
    assert breakers.state(1) == OPEN
    assert not breakers.allows(1)


def test_after_the_cooldown_one_trial_goes_through_and_decides() -> None:
    breakers = Breakers(failures=1, cooldown=5)
    breakers.failure(1, now=100.0)
    assert not breakers.allows(1, now=104.9)
    assert breakers.allows(1, now=105.1)
    assert breakers.state(1) == HALF_OPEN
    breakers.acquired(1)
    assert not breakers.allows(1, now=105.2)  # only one trial at a time
    breakers.failure(1, now=105.3)
    assert breakers.state(1) == OPEN and not breakers.allows(1, now=106.0)
    assert breakers.allows(1, now=110.4)
    assert breakers.tripped == {1}
    breakers.acquired(1)
    breakers.success(1)
    assert breakers.state(1) == CLOSED and breakers.allows(1)
    # What the router's explanations look at: a node that failed and recovered is not among them.
    assert breakers.tripped == set()


def test_a_trial_without_a_verdict_lets_another_trial_through() -> None:
    breakers = Breakers(failures=1, cooldown=1)
    breakers.failure(1, now=0.0)
    assert breakers.allows(1, now=2.0)
    breakers.acquired(1)
    breakers.released(1)  # the client left before the node answered
    assert breakers.allows(1, now=2.1)


@pytest.fixture
def two_workers(redis_url):
    return (
        SharedCounters(redis_url, breakers=Breakers(failures=2, cooldown=30)),
        SharedCounters(redis_url, breakers=Breakers(failures=2, cooldown=30)),
    )


async def test_an_open_breaker_is_seen_by_every_worker_and_so_is_its_closing(two_workers) -> None:
    a, b = two_workers
    a.breakers.failure(9)
    a.breakers.failure(9)
    await a.sync_once()
    await b.sync_once()
    assert b.breakers.state(9) == OPEN and not b.breakers.allows(9)
    assert a.breakers.tripped == b.breakers.tripped == {9}
    b.breakers.nodes[9].until = 0  # cool-down over on B: its trial succeeds
    assert b.breakers.allows(9)
    b.breakers.acquired(9)
    b.breakers.success(9)
    await b.sync_once()
    await a.sync_once()
    assert a.breakers.state(9) == CLOSED and a.breakers.allows(9)
    assert a.breakers.tripped == b.breakers.tripped == set()
