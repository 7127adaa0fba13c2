"""The prober's core on a real event loop and real sockets: its own stalls eject nobody, a real
failure is still seen, keep-alive holds, and what a flush writes to Redis."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
import redis

from enginesim.testing import run_simulator
from nodes.live import health as live_health
from nodes.prober import publish
from nodes.prober.hysteresis import HealthState
from nodes.prober.runner import ProberCore
from nodes.prober.targets import ProbeSettings, Target


@pytest.fixture
def silent_engine() -> Iterator[str]:
    """A socket that accepts connections (the kernel does) but never answers: a frozen engine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def target(node_id: int, url: str, *, interval: float = 1.0, timeout: float = 0.3, failures: int = 2) -> Target:
    return Target(node_id, f"{url}/health", ProbeSettings(interval, timeout, failures, 2), True)


@contextlib.asynccontextmanager
async def running(core: ProberCore):
    """The core dispatching, with its loop monitor, until the block ends."""
    loop = asyncio.get_running_loop()

    async def monitor() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(core.lag.tick)
            now = loop.time()
            core.lag.record(now, max(0.0, now - before - core.lag.tick))

    tasks = [asyncio.create_task(monitor()), asyncio.create_task(core.dispatch_forever(lambda: True))]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await core.close()


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_stall_of_the_probers_own_loop_ejects_no_healthy_node(engine_stub) -> None:
    url, _ = engine_stub
    core = ProberCore(concurrency=8, max_lag=0.2)
    core.seed(1, HealthState("healthy"))
    async with running(core):
        core.set_targets({1: target(1, url, failures=1)}, asyncio.get_running_loop().time())
        await until(lambda: core.counts["sent"] >= 1)
        for _ in range(3):  # the prober's process starved of CPU for longer than the probe timeout
            await asyncio.sleep(0.05)
            time.sleep(0.8)
        await asyncio.sleep(1.5)
        core.judge_results()
    assert core.counts["fail"] == 0
    assert core.counts["void"] >= 1  # the probes it sent late or could not vouch for decided nothing
    assert core.states[1].state == "healthy"
    assert core.take_pending().transitions == {}


async def test_a_frozen_engine_is_still_ejected_within_its_window(engine_stub, silent_engine) -> None:
    url, _ = engine_stub
    core = ProberCore(concurrency=8, max_lag=0.2)
    core.seed(1, HealthState("healthy"))
    core.seed(2, HealthState("healthy"))
    started = time.monotonic()
    async with running(core):
        core.set_targets(
            {1: target(1, url), 2: target(2, silent_engine)}, asyncio.get_running_loop().time(), first=True
        )

        def judged() -> bool:
            core.judge_results()
            return core.states[2].state == "unhealthy"

        await until(judged, timeout=5.0)
    took = time.monotonic() - started
    # Two failed probes, one interval apart, each given up on after its timeout; first one within an interval.
    assert took < 2 * 1.0 + 0.3 + 0.5
    assert core.states[1].state == "healthy"
    assert core.take_pending().transitions == {2: "unhealthy"}
    assert core.counts["healthy_to_unhealthy"] == 1 and core.counts["transitions"] == 1  # what the status reports


async def test_a_probe_keeps_its_connection_alive_between_probes() -> None:
    core = ProberCore(concurrency=8, max_lag=0.2)
    with run_simulator() as engine:  # speaks HTTP/1.1 with keep-alive, as engines do
        async with running(core):
            core.set_targets({1: target(1, engine.url, interval=0.2, timeout=0.15)}, asyncio.get_running_loop().time())
            await until(lambda: core.counts["sent"] >= 5)
            assert core.connections_opened() == 1


async def test_a_flush_publishes_every_state_with_the_version_when_one_changed_and_records_without(redis_url) -> None:
    client = redis.Redis.from_url(redis_url)
    core = ProberCore(concurrency=1, max_lag=0.2)
    states = {1: HealthState("unhealthy", 2, 0, 5.0), 2: HealthState("healthy")}
    record = live_health.HealthRecord("unhealthy", 5.0, 2, 0, None, "no answer within 1 s", 6.0)
    core.pending.transitions[1] = "unhealthy"
    core.pending.records[1] = record
    with client.pipeline(transaction=True) as pipe:
        publish.queue_flush(pipe, core.take_pending(), states, history=5, full=False)
        pipe.execute()
    assert live_health.read_states_sync(client) == {1: "unhealthy", 2: "healthy"}
    assert client.get("routerpanel:health-states:version") == b"1"
    assert live_health.read_records_sync(client) == {1: record}
    core.pending.records[2] = live_health.HealthRecord("healthy", 1.0, 0, 7, 0.4, "OK", 6.0)
    with client.pipeline(transaction=True) as pipe:
        publish.queue_flush(pipe, core.take_pending(), states, history=5, full=False)
        pipe.execute()
    assert client.get("routerpanel:health-states:version") == b"1"  # a record alone moves no version
    client.delete("routerpanel:health-states")  # Redis lost its data
    with client.pipeline(transaction=True) as pipe:
        publish.queue_flush(pipe, core.take_pending(), states, history=5, full=True)
        pipe.execute()
    assert live_health.read_states_sync(client) == {1: "unhealthy", 2: "healthy"}
    assert client.get("routerpanel:health-states:version") == b"2"
    restarted = publish.seed_from_records(live_health.read_records_sync(client) or {})
    assert restarted[2] == HealthState("healthy", 0, 7, 1.0)  # a new prober starts where this one left off
