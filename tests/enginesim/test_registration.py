"""Simulated engines registering with the real NanoCtrl binary on a real Redis (the protocol:
``enginesim/registration.py``)."""

from __future__ import annotations

import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from enginesim.testing import run_simulator
from tests.procs import PYTHON, REPO_ROOT, free_port, running, wait_for_port

pytestmark = pytest.mark.e2e

NANOCTRL = shutil.which("nanoctrl") or str(Path(PYTHON).with_name("nanoctrl"))


def nanoctrl_argv(port: int, redis_url: str) -> list[str]:
    return [NANOCTRL, "server", "--host", "127.0.0.1", "--port", str(port), "--redis-url", redis_url]


@pytest.fixture(scope="module")
def nanoctrl(redis_server: str) -> Iterator[str]:
    """A real NanoCtrl for the module; yields its address (host:port)."""
    port = free_port()
    with running(nanoctrl_argv(port, redis_server.rsplit("/", 1)[0]), port=port):
        yield f"127.0.0.1:{port}"


@pytest.fixture
def scope() -> str:
    """A scope of its own for each test, so tests never see each other's entities."""
    return f"t{uuid.uuid4().hex[:8]}"


def entities(address: str, scope: str) -> dict[str, dict]:
    body = {"entity_type": "service", "scope": scope}
    answer = httpx.post(f"http://{address}/list_entities", json=body, timeout=5).json()
    assert answer["status"] == "ok"
    return {e["entity_id"]: e for e in answer["entities"]}


def wait_until(predicate, *, timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def ctrl_args(address: str, scope: str, interval: float = 1.0) -> list[str]:
    return [f"--ctrl-address={address}", f"--ctrl-scope={scope}", f"--heartbeat-interval={interval}"]


def test_two_engines_register_and_a_cleanly_stopped_one_is_gone_at_once(nanoctrl, scope):
    port = free_port()
    command = [PYTHON, "-m", "enginesim", "--engine=dlengine", "--role=decode", f"--port={port}"]
    command += ["--served-model-name=qwen", "--model-path=/models/Qwen3-8B", *ctrl_args(nanoctrl, scope)]
    with (
        run_simulator(
            engine="nanodeploy", role="prefill", served_model_name="qwen", extra_args=ctrl_args(nanoctrl, scope)
        ) as prefill,
        running(command, port=port, cwd=REPO_ROOT, timeout=30) as decode_proc,
    ):
        prefill_id = f"nanodeploy-qwen-127.0.0.1:{prefill.port}"
        decode_id = f"dlengine-qwen-127.0.0.1:{port}"
        wait_until(lambda: {prefill_id, decode_id} <= set(entities(nanoctrl, scope)), timeout=15)
        listed = entities(nanoctrl, scope)
        decode = listed[decode_id]
        assert decode["kind"] == "dlengine"
        assert decode["endpoint"] == {"host": "127.0.0.1", "port": port, "protocol": "http"}
        assert decode["metadata"] == {
            "served_model_name": "qwen",
            "model_path": "/models/Qwen3-8B",
            "role": "decode",
            "host": "127.0.0.1",
            "port": port,
        }
        assert listed[prefill_id]["kind"] == "nanodeploy"
        assert listed[prefill_id]["metadata"]["role"] == "prefill"

        decode_proc.send_signal(signal.SIGTERM)
        assert decode_proc.wait(timeout=15) == 0
        listed = entities(nanoctrl, scope)
        assert decode_id not in listed
        assert prefill_id in listed


def test_ctrl_c_unregisters_too(nanoctrl, scope):
    with run_simulator(engine="nanodeploy", extra_args=ctrl_args(nanoctrl, scope)) as sim:
        entity_id = f"nanodeploy-sim-model-127.0.0.1:{sim.port}"
        wait_until(lambda: entity_id in entities(nanoctrl, scope), timeout=15)
        sim.proc.send_signal(signal.SIGINT)
        assert sim.proc.wait(timeout=15) == 0
        assert entity_id not in entities(nanoctrl, scope)


def test_an_engine_registers_again_when_nanoctrl_forgot_it(nanoctrl, scope):
    with run_simulator(engine="nanodeploy", extra_args=ctrl_args(nanoctrl, scope, interval=0.5)) as sim:
        entity_id = f"nanodeploy-sim-model-127.0.0.1:{sim.port}"
        wait_until(lambda: entity_id in entities(nanoctrl, scope), timeout=15)
        body = {"entity_type": "service", "entity_id": entity_id, "scope": scope}
        assert httpx.post(f"http://{nanoctrl}/unregister", json=body, timeout=5).json()["status"] == "ok"
        assert entity_id not in entities(nanoctrl, scope)
        wait_until(lambda: entity_id in entities(nanoctrl, scope), timeout=15)


def test_an_engine_keeps_serving_while_nanoctrl_is_down_and_registers_when_it_comes_up(redis_server, scope):
    ctrl_port = free_port()
    address = f"127.0.0.1:{ctrl_port}"
    with run_simulator(engine="dlengine", extra_args=ctrl_args(address, scope, interval=0.5)) as sim:
        assert httpx.get(sim.url + "/health", timeout=5).text == "OK"
        body = {"model": "sim-model", "prompt": "x", "max_tokens": 1}
        assert httpx.post(sim.url + "/v1/completions", json=body, timeout=5).status_code == 200
        with running(nanoctrl_argv(ctrl_port, redis_server.rsplit("/", 1)[0]), port=ctrl_port):
            wait_for_port(ctrl_port)
            entity_id = f"dlengine-sim-model-127.0.0.1:{sim.port}"
            wait_until(lambda: entity_id in entities(address, scope), timeout=15)


@pytest.mark.slow
def test_a_killed_engine_stays_listed_until_nanoctrls_60_second_ttl_expires(nanoctrl, scope):
    with run_simulator(engine="nanodeploy", extra_args=ctrl_args(nanoctrl, scope)) as sim:
        entity_id = f"nanodeploy-sim-model-127.0.0.1:{sim.port}"
        wait_until(lambda: entity_id in entities(nanoctrl, scope), timeout=15)
        sim.proc.send_signal(signal.SIGKILL)
        sim.proc.wait(timeout=10)
        killed_at = time.monotonic()
        assert entity_id in entities(nanoctrl, scope)  # no unregister: only the TTL can remove it
        wait_until(lambda: entity_id not in entities(nanoctrl, scope), timeout=90, interval=1.0)
        assert time.monotonic() - killed_at > 30
