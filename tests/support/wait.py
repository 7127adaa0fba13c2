"""Waiting for a condition, the one way the suite does it: poll often, return what the condition
returned, fail with a message that says what never happened. A test never sleeps for a time and
hopes the condition holds by then."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["wait_until", "wait_until_async"]

T = TypeVar("T")

INTERVAL = 0.02


Message = str | Callable[[], str]


def _failure(message: Message, timeout: float, last: object) -> AssertionError:
    text = message() if callable(message) else message
    return AssertionError(f"{text} (not within {timeout} s; last seen: {last!r})")


def wait_until(condition: Callable[[], T], timeout: float, message: Message, *, interval: float = INTERVAL) -> T:
    """Call ``condition`` every ``interval`` seconds until it returns something truthy; return that.

    Fails with ``message`` (a string, or a function called at that moment, to show the state the
    condition saw) and the last value seen after ``timeout`` seconds. The condition is tried once
    more after the deadline has passed (a try that starts after it), so a slow machine never fails a
    condition that holds, and a condition that takes long to evaluate is judged on a look that began
    once the deadline had passed, not on one that began right after the start.
    """
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        value = condition()
        if value:
            return value
        if started >= deadline:
            raise _failure(message, timeout, value)
        time.sleep(interval)


async def wait_until_async(
    condition: Callable[[], T | Awaitable[T]], timeout: float, message: Message, *, interval: float = INTERVAL / 2
) -> T:
    """``wait_until`` for a coroutine: the same contract, but it yields to the event loop between
    tries (servers the test runs in-process share that loop). ``condition`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        value = condition()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if started >= deadline:
            raise _failure(message, timeout, value)
        await asyncio.sleep(interval)
