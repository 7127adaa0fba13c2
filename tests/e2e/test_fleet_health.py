"""Health checking a fleet: 200 simulated engines (one ``enginesim --fleet`` process, fast mode)
probed every second while a client sends a minute of back-to-back requests. No request is refused
for want of a node and no healthy engine is ever marked unhealthy; one more engine, in a process of
its own, is stopped (SIGSTOP, then SIGKILL), ejected within its window and readmitted when it is
back. Real processes: RouterPanel (uvicorn), the prober, the fleet, the lone engine.

About 90 s: the minute of traffic and the set-up (200 registrations through the REST API)."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from enginesim.testing import run_fleet, run_simulator
from nodes.live.health import read_states_sync
from tests.support.ports import free_port
from tests.support.stack import PROXY_KEY, RouterPanelStack, StackSpec
from tests.support.traffic import Traffic
from tests.support.wait import wait_until

FLEET = 200
TRAFFIC_SECONDS = 60.0
INTERVAL, TIMEOUT, FAILURES, FLUSH = 1.0, 0.5, 2, 0.5
# A stopped engine is unhealthy after FAILURES probes (the first within an interval of the stop), each
# given up on after TIMEOUT, published at the next flush; the web worker applies it within a second.
WINDOW = FAILURES * INTERVAL + TIMEOUT + FLUSH
SLACK = 1.5  # two shared cores, other jobs: scheduling noise

# The web process and the prober, with the probing figures above.
STACK = StackSpec(
    prober=True,
    settings={
        "ROUTERPANEL_HEALTH_INTERVAL": str(INTERVAL),
        "ROUTERPANEL_HEALTH_TIMEOUT": str(TIMEOUT),
        "ROUTERPANEL_HEALTH_FAILURES": str(FAILURES),
        "ROUTERPANEL_PROBER_FLUSH_INTERVAL": str(FLUSH),
    },
)
pytestmark = [pytest.mark.e2e, pytest.mark.stack(STACK)]


def register(api: httpx.Client, url: str, models: list[str]) -> int:
    response = api.post("/api/nodes/", json={"url": url, "models": models, "engine_type": "openai"})
    assert response.status_code == 201, response.text
    assert response.json()["health"] == "healthy", response.json()  # probed at once: it takes traffic from now on
    return response.json()["id"]


def state(client: redis.Redis, node_id: int) -> str:
    return (read_states_sync(client) or {}).get(node_id, "")


def wait_for_state(client: redis.Redis, node_id: int, wanted: str, timeout: float) -> float:
    started = time.monotonic()
    wait_until(lambda: state(client, node_id) == wanted, timeout, f"node {node_id} not {wanted} within {timeout} s")
    return time.monotonic() - started


def test_a_fleet_of_200_is_probed_without_false_ejections_and_a_stopped_engine_is_still_seen(
    stack: RouterPanelStack,
) -> None:
    api, client = stack.api, redis.Redis.from_url(stack.redis_url)
    victim_port = free_port()
    lone = {"served_model_name": "victim-model", "port": victim_port}
    with run_fleet(FLEET, served_model_name="fleet-model") as fleet:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=4) as pool:
            fleet_ids = list(pool.map(lambda url: register(api, url, ["fleet-model"]), fleet.urls))
        registered_in = time.monotonic() - started
        victim_cm = run_simulator(**lone)
        victim = victim_cm.__enter__()
        try:
            victim_id = register(api, victim.url, ["victim-model"])
            # victim-model is the victim and two of the fleet: sick, it leaves its route (no panic at 2 of 3).
            for url in fleet.urls[:2]:
                node_id = fleet_ids[fleet.urls.index(url)]
                patch = api.patch(f"/api/nodes/{node_id}/", json={"models": ["fleet-model", "victim-model"]})
                assert patch.status_code == 200, patch.text
            traffic_started = time.time()
            traffic = Traffic(stack.base, "fleet-model", PROXY_KEY)
            traffic.start()
            time.sleep(10.0)  # a quiet stretch first: 200 engines probed every second

            figures: dict[str, float] = {}
            stopped = time.monotonic()
            victim.proc.send_signal(signal.SIGSTOP)  # frozen: connections accepted, never answered
            figures["sigstop_ejected_s"] = wait_for_state(client, victim_id, "unhealthy", WINDOW + SLACK)
            assert not victim_routed(stack.base)
            victim.proc.send_signal(signal.SIGCONT)
            figures["sigcont_readmitted_s"] = wait_for_state(client, victim_id, "healthy", WINDOW + SLACK)

            time.sleep(5.0)
            victim.proc.send_signal(signal.SIGKILL)  # gone: connections refused
            victim.proc.wait()
            figures["sigkill_ejected_s"] = wait_for_state(client, victim_id, "unhealthy", WINDOW + SLACK)
            restarted_cm = run_simulator(**lone)
            restarted_cm.__enter__()
            try:
                figures["restart_readmitted_s"] = wait_for_state(client, victim_id, "healthy", WINDOW + SLACK)
                time.sleep(max(0.0, TRAFFIC_SECONDS - (time.monotonic() - stopped) - 10.0))
            finally:
                traffic.stop.set()
                traffic.join(timeout=30)
                restarted_cm.__exit__(None, None, None)
        finally:
            with contextlib.suppress(Exception):
                victim.proc.send_signal(signal.SIGCONT)
            with contextlib.suppress(Exception):
                victim_cm.__exit__(None, None, None)
        records = {int(k): json.loads(v) for k, v in client.hgetall("routerpanel:health-records").items()}
        status = json.loads(client.get("routerpanel:prober:status"))

    flapped = [i for i in fleet_ids if records[i]["state"] != "healthy" or records[i]["since"] > traffic_started]
    print(
        f"\n{FLEET} engines registered in {registered_in:.1f} s; {sum(traffic.answers.values())} requests in "
        f"~{TRAFFIC_SECONDS:.0f} s: {dict(traffic.answers)}; false unhealthy transitions: {len(flapped)}; "
        + "; ".join(f"{name} {value:.2f} s" for name, value in figures.items())
        + f" (window {WINDOW:.1f} s); prober: {status['counts']}, loop lag {status['loop_lag']}"
    )
    assert flapped == []
    assert set(traffic.answers) == {"200"}, traffic.answers
    assert traffic.answers["200"] > 1000
    for name, value in figures.items():
        assert value <= WINDOW + SLACK, name


def victim_routed(base: str) -> bool:
    """Whether victim-model's route still names the victim: readiness counts its healthy nodes."""

    def left_out() -> bool:
        report = httpx.get(base + "/health/ready", timeout=10).json()
        return report["models"]["victim-model"]["healthy_nodes"]["hybrid"] == 2

    try:
        wait_until(left_out, 2.0, "")  # the worker applies the live state within a second
    except AssertionError:
        return True
    return False
