"""``tests.support.wait``: a condition is judged on a look that began after the deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.wait import wait_until, wait_until_async


class SlowLooks:
    """A condition whose every look takes ``seconds`` and which holds from its ``holds_from``-th look on."""

    def __init__(self, seconds: float, holds_from: int) -> None:
        self.seconds, self.holds_from = seconds, holds_from
        self.starts: list[float] = []

    def look(self) -> bool:
        self.starts.append(time.monotonic())
        time.sleep(self.seconds)
        return len(self.starts) >= self.holds_from


def test_a_look_longer_than_the_timeout_is_followed_by_one_that_starts_after_the_deadline() -> None:
    slow = SlowLooks(0.2, holds_from=2)
    assert wait_until(slow.look, 0.1, "never held") is True
    assert len(slow.starts) == 2 and slow.starts[1] - slow.starts[0] >= 0.1


def test_a_condition_that_never_holds_fails_after_a_look_that_began_past_the_deadline() -> None:
    slow = SlowLooks(0.2, holds_from=10**6)
    began = time.monotonic()
    with pytest.raises(AssertionError, match="never held"):
        wait_until(slow.look, 0.1, "never held")
    assert len(slow.starts) == 2 and slow.starts[-1] >= began + 0.1


async def test_the_async_wait_judges_the_same_way() -> None:
    looks: list[float] = []

    async def look() -> bool:
        looks.append(time.monotonic())
        await asyncio.sleep(0.2)
        return len(looks) >= 2

    assert await wait_until_async(look, 0.1, "never held") is True
    assert len(looks) == 2
