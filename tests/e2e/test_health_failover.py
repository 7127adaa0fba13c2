"""Kill one of two hybrid engines under 32-way load: no client error, unhealthy within 3 s, back in
rotation within 5 s of its restart. Real processes: RouterPanel (uvicorn), the prober running the
active health checks (1 s interval, 2 failures), and two simulated engines."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest

from enginesim.testing import run_simulator
from tests.support.ports import free_port
from tests.support.stack import RouterPanelStack, StackSpec
from tests.support.wait import wait_until, wait_until_async

# The prober probes every second with a 0.5 s timeout: a killed engine is unhealthy within 3 s.
HEALTH = {"ROUTERPANEL_HEALTH_INTERVAL": "1", "ROUTERPANEL_HEALTH_TIMEOUT": "0.5"}
pytestmark = [pytest.mark.e2e, pytest.mark.stack(StackSpec(prober=True, settings=HEALTH))]

CONCURRENCY = 32


async def load(stack: RouterPanelStack, stop: asyncio.Event, results: dict[str, int], errors: list[str]) -> None:
    """One client of the load script: non-streaming completions back to back."""
    headers = {"Authorization": f"Bearer {stack.key}"}
    body = {"model": "failover-model", "prompt": "keep going", "max_tokens": 4}
    async with httpx.AsyncClient(base_url=stack.base, headers=headers, timeout=30) as client:
        while not stop.is_set():
            try:
                response = await client.post("/v1/completions", json=body)
            except httpx.HTTPError as exc:
                errors.append(f"{exc.__class__.__name__}: {exc}")
                continue
            if response.status_code == 200:
                results["ok"] += 1
            else:
                errors.append(f"HTTP {response.status_code}: {response.text[:200]}")


def health(stack: RouterPanelStack, url: str) -> str:
    found = stack.api.get("/api/nodes/", params={"url": url}).json()["results"]
    return next(n for n in found if n["url"] == url)["health"]


def served(sim) -> int:
    return sim.stats()["requests"]["by_endpoint"].get("/v1/completions", 0)


def test_killing_an_engine_under_load_costs_no_request_and_it_comes_back(stack: RouterPanelStack) -> None:
    victim_port = free_port()
    engine = {"engine": "nanodeploy", "served_model_name": "failover-model", "ttft_ms": 1.0, "itl_ms": 0.5}
    with run_simulator(**engine) as survivor:
        victim_cm = run_simulator(port=victim_port, **engine)
        victim = victim_cm.__enter__()
        for sim in (survivor, victim):
            stack.add_node(sim.url, ["failover-model"], settle=False)
        wait_until(
            lambda: all(health(stack, s.url) == "healthy" for s in (survivor, victim)), 10, "nodes never became healthy"
        )

        figures: dict[str, float] = {}

        async def scenario() -> tuple[dict[str, int], list[str]]:
            stop = asyncio.Event()
            results, errors = {"ok": 0}, []
            clients = [asyncio.create_task(load(stack, stop, results, errors)) for _ in range(CONCURRENCY)]
            restarted = None
            try:
                # Under load: every client has had answers, from both engines.
                await wait_until_async(lambda: results["ok"] >= 2 * CONCURRENCY, 30, "the load never got going")
                await wait_until_async(
                    lambda: asyncio.to_thread(lambda: served(victim) > 0 and served(survivor) > 0),
                    10,
                    "the load did not reach both engines",
                )
                victim.proc.kill()  # SIGKILL: no goodbye, in-flight connections reset
                victim.proc.wait()
                killed = time.monotonic()
                await wait_until_async(
                    lambda: asyncio.to_thread(lambda: health(stack, victim.url) == "unhealthy"),
                    10,
                    "the dead node was never marked unhealthy",
                )
                figures["unhealthy_after_s"] = time.monotonic() - killed
                await asyncio.sleep(1.0)  # the load goes on a while against the unhealthy node: still no error
                restarted = run_simulator(port=victim_port, **engine)
                revived = restarted.__enter__()
                started = time.monotonic()
                await wait_until_async(
                    lambda: asyncio.to_thread(served, revived), 15, "the restarted node never got traffic again"
                )
                figures["back_in_rotation_after_s"] = time.monotonic() - started
                await asyncio.sleep(1.0)  # and a while with the node back: still no error
            finally:
                stop.set()
                await asyncio.gather(*clients)
                if restarted is not None:
                    restarted.__exit__(None, None, None)
            return results, errors

        try:
            results, errors = asyncio.run(scenario())
        finally:
            with contextlib.suppress(Exception):
                victim_cm.__exit__(None, None, None)
    print(
        f"\nfailover under {CONCURRENCY}-way load: {results['ok']} requests ok, {len(errors)} errors; "
        f"dead node unhealthy after {figures['unhealthy_after_s']:.2f} s; "
        f"restarted node back in rotation after {figures['back_in_rotation_after_s']:.2f} s"
    )
    assert errors == []
    assert results["ok"] > 100
    assert figures["unhealthy_after_s"] < 3.0
    assert figures["back_in_rotation_after_s"] < 5.0
