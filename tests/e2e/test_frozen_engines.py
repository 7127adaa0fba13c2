"""A frozen engine (SIGSTOP: it still accepts connections, and never answers) under traffic:
requests already waiting on it are retried on the other node as soon as the health checks mark it
unhealthy, instead of hanging until the client or the first-token timeout (120 s) gives up.
Real processes: RouterPanel (uvicorn with the edge), the prober running the health checks, two
simulated engines."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from enginesim.testing import run_simulator
from tests.matrix import Matrix
from tests.support.stack import PROXY_KEY, RouterPanelStack, StackSpec
from tests.support.wait import wait_until

# The web process, and the prober running the health checks.
pytestmark = [pytest.mark.e2e, pytest.mark.stack(StackSpec(prober=True))]

MODEL = "frozen-model"
CLIENT_TIMEOUT = 30.0  # what a patient client waits; on main the requests on the frozen node hit it
BOUND = 8.0  # health checks notice in about 2 s; a retry on the other node takes well under a second

MATRIX = Matrix("frozen engines (tests/e2e/test_frozen_engines.py)")


@pytest.fixture(scope="module", autouse=True)
def _print_matrix() -> Iterator[None]:
    yield
    MATRIX.print()


def health(api: httpx.Client, url: str) -> str:
    return next(n for n in api.get("/api/nodes/", params={"url": url}).json()["results"] if n["url"] == url)["health"]


async def one_request(base: str, stream: bool) -> tuple[int, float, str]:
    """A completion of 8 tokens (a stream read to its end); its status, seconds and answering node."""
    body = {"model": MODEL, "prompt": "[[len=8]] keep going", "max_tokens": 8, "stream": stream}
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=CLIENT_TIMEOUT) as client:
        try:
            async with client.stream(
                "POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {PROXY_KEY}"}
            ) as response:
                text = (await response.aread()).decode()
        except httpx.TimeoutException:
            return 0, time.monotonic() - started, "client timeout"
    if stream and not text.rstrip().endswith("data: [DONE]"):
        return -1, time.monotonic() - started, text[-200:]
    return response.status_code, time.monotonic() - started, response.headers.get("x-routerpanel-node", "")


def test_requests_waiting_on_a_frozen_engine_move_to_the_other_node(stack: RouterPanelStack) -> None:
    api, routerpanel = stack.api, stack.base
    engine = {"served_model_name": MODEL, "ttft_ms": 5.0, "itl_ms": 5.0}
    with run_simulator(**engine) as survivor, run_simulator(**engine) as frozen:
        for sim in (survivor, frozen):
            added = api.post("/api/nodes/", json={"url": sim.url, "models": [MODEL], "engine_type": "openai"})
            assert added.status_code == 201, added.text
        wait_until(
            lambda: all(health(api, s.url) == "healthy" for s in (survivor, frozen)),
            15,
            "the nodes never became healthy",
        )
        # Both nodes have served: the web worker applies the live health within a second of the API
        # showing it (docs/decisions/0008-health-as-live-state.md).
        served: set[str] = set()

        def both_served() -> bool:
            status, _, node = asyncio.run(one_request(routerpanel, False))
            assert status == 200, node
            served.add(node)
            return served == {survivor.url, frozen.url}

        wait_until(both_served, 15, lambda: f"only {served} served", interval=0)

        os.kill(frozen.proc.pid, signal.SIGSTOP)
        try:
            stopped = time.monotonic()

            async def burst() -> list[tuple[int, float, str]]:
                return await asyncio.gather(*[one_request(routerpanel, stream) for stream in (False, True) * 4])

            results = asyncio.run(burst())
            unhealthy = health(api, frozen.url)
            total = time.monotonic() - stopped
        finally:
            os.kill(frozen.proc.pid, signal.SIGCONT)

    slowest = max(seconds for _, seconds, _ in results)
    statuses = sorted(status for status, _, _ in results)
    print(
        f"\nfrozen engine: {len(results)} requests sent after SIGSTOP, statuses {statuses}, slowest "
        f"{slowest:.2f} s (node now {unhealthy}); all done {total:.2f} s after the stop"
    )
    MATRIX.add(
        "requests (4 streamed, 4 not) sent while an engine is SIGSTOPped",
        len(results),
        f"statuses {statuses}, slowest {slowest:.2f} s (bound {BOUND:g} s; client gives up at {CLIENT_TIMEOUT:g} s)",
        ok=statuses == [200] * len(results) and slowest < BOUND,
    )
    assert statuses == [200] * len(results), results
    assert all(node == survivor.url for _, _, node in results), results
    assert slowest < BOUND, results
    assert unhealthy == "unhealthy"
