"""The attempt loop's wait (``proxy.deadline.Deadline``) keeps ``asyncio.timeout_at``'s contract:
a deadline that passes, or is moved into the past (an ejection), ends the wait in ``TimeoutError``;
a cancellation from elsewhere (the client left) stays a cancellation, even when both come at once;
nothing of the wait outlives it."""

from __future__ import annotations

import asyncio

import pytest

from proxy.deadline import Deadline


async def wait_in(deadline: Deadline, started: asyncio.Event | None = None, seconds: float = 5.0) -> str:
    with deadline:
        if started is not None:
            started.set()
        await asyncio.sleep(seconds)
    return "answered"


async def waiting(deadline: Deadline) -> asyncio.Task:
    """A task waiting inside ``deadline``, once it is there."""
    started = asyncio.Event()
    task = asyncio.ensure_future(wait_in(deadline, started))
    await started.wait()
    return task


async def test_a_deadline_that_passes_ends_the_wait_in_a_timeout():
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, loop.time() + 0.05)
    started = loop.time()
    with pytest.raises(TimeoutError):
        await wait_in(deadline)
    assert 0.04 <= loop.time() - started < 1.0
    assert deadline.expired()
    assert asyncio.current_task().cancelling() == 0


async def test_without_a_deadline_only_a_reschedule_into_the_past_ends_the_wait():
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, None)
    task = await waiting(deadline)
    await asyncio.sleep(0.05)
    assert not task.done() and not deadline.expired()

    deadline.reschedule(-1.0)  # as ``Attempt.eject`` does
    with pytest.raises(TimeoutError):
        await task
    assert deadline.expired() and task.cancelling() == 0


async def test_a_reschedule_moves_the_deadline_later():
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, loop.time() + 0.05)

    async def waits() -> str:
        with deadline:
            deadline.reschedule(loop.time() + 5.0)  # the stream's headers came: now the first token's bound
            await asyncio.sleep(0.2)
        return "answered"

    assert await waits() == "answered"
    assert not deadline.expired()


async def test_a_deadline_moved_later_ends_the_wait_then_and_not_before():
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, loop.time() + 0.05)
    task = await waiting(deadline)
    deadline.reschedule(loop.time() + 0.3)  # the headers came: the first token's bound, later
    await asyncio.sleep(0.15)  # past the first deadline
    assert not task.done() and not deadline.expired()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await task
    assert 0.1 <= loop.time() - started < 1.0 and deadline.expired()


async def test_a_deadline_taken_away_never_ends_the_wait_and_one_set_again_does():
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, loop.time() + 0.05)
    task = await waiting(deadline)
    deadline.reschedule(None)
    await asyncio.sleep(0.15)
    assert not task.done() and not deadline.expired()
    deadline.reschedule(loop.time() + 0.05)
    with pytest.raises(TimeoutError):
        await task
    assert deadline.expired()


async def test_an_ejection_after_a_later_deadline_still_ends_the_wait_at_once():
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, loop.time() + 5.0)
    task = await waiting(deadline)
    deadline.reschedule(loop.time() + 60.0)
    deadline.reschedule(-1.0)  # as ``Attempt.eject`` does
    started = loop.time()
    with pytest.raises(TimeoutError):
        await task
    assert loop.time() - started < 1.0


async def test_a_cancellation_from_elsewhere_stays_a_cancellation():
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, loop.time() + 5.0)
    task = await waiting(deadline)
    task.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not deadline.expired()


async def test_an_ejection_and_a_cancellation_at_once_stay_a_cancellation():
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, None)
    task = await waiting(deadline)
    deadline.reschedule(-1.0)
    await asyncio.sleep(0)  # the ejection's cancel is delivered ...
    task.cancel()  # ... and the client leaves before the task ran again
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_wait_that_ended_first_is_not_cancelled_by_a_late_ejection():
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, None)
    assert await wait_in(deadline, seconds=0.0) == "answered"
    deadline.reschedule(-1.0)  # too late: the wait is over
    await asyncio.sleep(0.05)  # a cancel sent now would land on this await
    assert not deadline.expired()


async def test_an_ejection_that_comes_as_the_wait_ends_does_not_reach_the_next_await():
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, None)
    with deadline:
        deadline.reschedule(-1.0)  # expires on the loop's next turn, after the wait is over
    await asyncio.sleep(0.05)
    assert not deadline.expired() and asyncio.current_task().cancelling() == 0


async def test_the_wait_must_run_in_a_task():
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, None)
    raised = loop.create_future()

    def outside_any_task() -> None:  # a loop callback: no current task
        try:
            with deadline:
                pass
        except RuntimeError as error:
            raised.set_result(error)

    loop.call_soon(outside_any_task)
    assert "inside a task" in str(await asyncio.wait_for(raised, 5))
