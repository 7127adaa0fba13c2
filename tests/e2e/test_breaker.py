"""The circuit breaker through real processes: a node that keeps answering 5xx stops getting
requests after N of them, gets one trial after the cool-down, and is back once it answers."""

from __future__ import annotations

import time

import httpx
import pytest

from enginesim.testing import run_simulator
from tests.support.wait import wait_until

# alone: under the parallel run's load a sixth request sometimes reached the failing node before the
# breaker had opened (twice in three parallel runs at load 9-12, never in one process).
pytestmark = [pytest.mark.e2e, pytest.mark.alone]

MODEL = "breaker-model"
FAILURES, COOLDOWN = 5, 5.0  # the settings' defaults, which the e2e server runs with


def chat(stack) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(stack.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {stack.key}"})


def requests_to(sim) -> int:
    return sim.stats()["requests"]["by_endpoint"].get("/v1/chat/completions", 0)


def test_a_failing_node_is_cut_off_then_tried_and_restored(stack) -> None:
    with run_simulator(served_model_name=MODEL) as sick, run_simulator(served_model_name=MODEL) as well:
        for sim in (sick, well):
            stack.add_node(sim.url, [MODEL], engine_type="openai", settle=False)
        stack.settle()
        sick.set_faults(error_rate=1.0, error_status=500)
        statuses = []
        while requests_to(sick) < FAILURES:
            statuses.append(chat(stack).status_code)
            assert len(statuses) < 50
        opened_at = time.monotonic()
        statuses += [chat(stack).status_code for _ in range(30)]
        assert requests_to(sick) == FAILURES  # the breaker opened: no more requests to it
        assert statuses.count(500) == FAILURES and statuses.count(200) == len(statuses) - FAILURES
        sick.set_faults()  # it recovers

        def tried_again() -> bool:
            assert chat(stack).status_code == 200
            return requests_to(sick) > FAILURES

        cooled = COOLDOWN + 5 - (time.monotonic() - opened_at)
        wait_until(tried_again, cooled, "no trial request after the cool-down", interval=0.05)
        assert time.monotonic() - opened_at > COOLDOWN - 0.5
        before = requests_to(sick)
        for _ in range(10):
            assert chat(stack).status_code == 200
        assert requests_to(sick) >= before + 4  # closed again: round robin includes it
