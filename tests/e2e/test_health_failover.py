"""Kill one of two hybrid engines under 32-way load: no client error, unhealthy within 3 s, back in
rotation within 5 s of its restart. Real processes: RouterPanel (uvicorn), the prober running the
active health checks (1 s interval, 2 failures), and two simulated engines."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import httpx
import pytest

from enginesim.testing import run_simulator
from tests.procs import free_port, prober_argv, redis_db, routerpanel_env, running, uvicorn_argv

pytestmark = pytest.mark.e2e

TOKEN = "e2e3333333333333333333333333333333333333"
PROXY_KEY = "rp-e2e-failover-key"
CONCURRENCY = 32


@pytest.fixture(scope="module")
def routerpanel(tmp_path_factory: pytest.TempPathFactory, redis_server: str) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("failover")
    env = routerpanel_env(
        directory,
        redis_db(redis_server, 2),
        token=TOKEN,
        proxy_key=PROXY_KEY,
        ROUTERPANEL_HEALTH_INTERVAL="1",
        ROUTERPANEL_HEALTH_TIMEOUT="0.5",
    )
    port = free_port()
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(uvicorn_argv(port), port=port, env=env, timeout=60))
        stack.enter_context(running(prober_argv(), env=env))
        yield f"http://127.0.0.1:{port}"


async def load(base: str, stop: asyncio.Event, results: dict[str, int], errors: list[str]) -> None:
    """One client of the load script: non-streaming completions back to back."""
    headers = {"Authorization": f"Bearer {PROXY_KEY}"}
    body = {"model": "failover-model", "prompt": "keep going", "max_tokens": 4}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
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


def node(api: httpx.Client, url: str) -> dict:
    return next(n for n in api.get("/api/nodes/", params={"url": url}).json()["results"] if n["url"] == url)


def test_killing_an_engine_under_load_costs_no_request_and_it_comes_back(routerpanel: str) -> None:
    api = httpx.Client(base_url=routerpanel, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    victim_port = free_port()
    engine = {"engine": "nanodeploy", "served_model_name": "failover-model", "ttft_ms": 1.0, "itl_ms": 0.5}
    with run_simulator(**engine) as survivor:
        victim_cm = run_simulator(port=victim_port, **engine)
        victim = victim_cm.__enter__()
        for sim in (survivor, victim):
            assert api.post("/api/nodes/", json={"url": sim.url, "models": ["failover-model"]}).status_code == 201
        deadline = time.monotonic() + 10
        while any(node(api, s.url)["health"] != "healthy" for s in (survivor, victim)):
            assert time.monotonic() < deadline, "nodes never became healthy"
            time.sleep(0.1)

        figures: dict[str, float] = {}

        async def scenario() -> tuple[dict[str, int], list[str]]:
            stop = asyncio.Event()
            results, errors = {"ok": 0}, []
            clients = [asyncio.create_task(load(routerpanel, stop, results, errors)) for _ in range(CONCURRENCY)]
            await asyncio.sleep(2.0)
            victim.proc.kill()  # SIGKILL: no goodbye, in-flight connections reset
            victim.proc.wait()
            killed = time.monotonic()
            while node(api, victim.url)["health"] != "unhealthy":
                assert time.monotonic() - killed < 10, "the dead node was never marked unhealthy"
                await asyncio.sleep(0.05)
            figures["unhealthy_after_s"] = time.monotonic() - killed
            await asyncio.sleep(1.0)
            restarted = run_simulator(port=victim_port, **engine)
            revived = restarted.__enter__()
            try:
                started = time.monotonic()
                while revived.stats()["requests"]["by_endpoint"].get("/v1/completions", 0) == 0:
                    assert time.monotonic() - started < 15, "the restarted node never got traffic again"
                    await asyncio.sleep(0.05)
                figures["back_in_rotation_after_s"] = time.monotonic() - started
                await asyncio.sleep(1.0)
            finally:
                stop.set()
                await asyncio.gather(*clients)
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
