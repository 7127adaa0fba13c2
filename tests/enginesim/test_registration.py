"""Simulated engines registering with the real NanoCtrl binary on a real Redis (the protocol:
``enginesim/registration.py``). That a SIGKILLed engine stays listed until NanoCtrl's 60 s TTL
expires is checked together with the registry sync's reaction to it, in one 60 s wait:
tests/e2e/test_registry_sync.py."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from enginesim.testing import run_simulator
from tests.support.ports import free_port
from tests.support.procs import PYTHON, REPO_ROOT, NanoCtrl, RedisServer, running
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def nanoctrl(redis_server: RedisServer) -> Iterator[NanoCtrl]:
    """A real NanoCtrl for the module."""
    server = NanoCtrl(redis_server.url().rsplit("/", 1)[0]).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def scope() -> str:
    """A scope of its own for each test, so tests never see each other's entities."""
    return f"t{uuid.uuid4().hex[:8]}"


def ctrl_args(address: str, scope: str, interval: float = 1.0) -> list[str]:
    return [f"--ctrl-address={address}", f"--ctrl-scope={scope}", f"--heartbeat-interval={interval}"]


def test_two_engines_register_and_a_cleanly_stopped_one_is_gone_at_once(nanoctrl, scope):
    port = free_port()
    command = [PYTHON, "-m", "enginesim", "--engine=dlengine", "--role=decode", f"--port={port}"]
    command += ["--served-model-name=qwen", "--model-path=/models/Qwen3-8B", *ctrl_args(nanoctrl.address, scope)]
    with (
        run_simulator(
            engine="nanodeploy", role="prefill", served_model_name="qwen", extra_args=ctrl_args(nanoctrl.address, scope)
        ) as prefill,
        running(command, port=port, cwd=REPO_ROOT, timeout=30) as decode_proc,
    ):
        prefill_id = f"nanodeploy-qwen-127.0.0.1:{prefill.port}"
        decode_id = f"dlengine-qwen-127.0.0.1:{port}"
        wait_until(lambda: {prefill_id, decode_id} <= set(nanoctrl.entities(scope)), 15, "never listed")
        listed = nanoctrl.entities(scope)
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
        listed = nanoctrl.entities(scope)
        assert decode_id not in listed
        assert prefill_id in listed


def test_ctrl_c_unregisters_too(nanoctrl, scope):
    with run_simulator(engine="nanodeploy", extra_args=ctrl_args(nanoctrl.address, scope)) as sim:
        entity_id = f"nanodeploy-sim-model-127.0.0.1:{sim.port}"
        wait_until(lambda: entity_id in nanoctrl.entities(scope), 15, "never listed")
        sim.proc.send_signal(signal.SIGINT)
        assert sim.proc.wait(timeout=15) == 0
        assert entity_id not in nanoctrl.entities(scope)


def test_an_engine_registers_again_when_nanoctrl_forgot_it(nanoctrl, scope):
    with run_simulator(engine="nanodeploy", extra_args=ctrl_args(nanoctrl.address, scope, interval=2.0)) as sim:
        entity_id = f"nanodeploy-sim-model-127.0.0.1:{sim.port}"
        wait_until(lambda: entity_id in nanoctrl.entities(scope), 15, "never listed")
        # Unregister right after a heartbeat: the next one, which finds the entity gone and
        # registers it again, is a whole interval away, after the listing below (2 s: on a loaded
        # machine the unregister and the listing took longer than half a second).
        entity_key = f"{scope}:service:{entity_id}"  # NanoCtrl renews its TTL on every heartbeat
        with redis.Redis.from_url(nanoctrl.redis_url) as registry:
            before = registry.pttl(entity_key)
            wait_until(lambda: registry.pttl(entity_key) > before, 5, "no heartbeat", interval=0.005)
        body = {"entity_type": "service", "entity_id": entity_id, "scope": scope}
        assert nanoctrl.post("unregister", body)["status"] == "ok"
        assert entity_id not in nanoctrl.entities(scope)
        wait_until(lambda: entity_id in nanoctrl.entities(scope), 15, "never registered again")


def test_an_engine_keeps_serving_while_nanoctrl_is_down_and_registers_when_it_comes_up(redis_server, scope):
    nanoctrl = NanoCtrl(redis_server.url().rsplit("/", 1)[0])  # its port is chosen; it is not started yet
    with run_simulator(engine="dlengine", extra_args=ctrl_args(nanoctrl.address, scope, interval=0.5)) as sim:
        assert httpx.get(sim.url + "/health", timeout=5).text == "OK"
        body = {"model": "sim-model", "prompt": "x", "max_tokens": 1}
        assert httpx.post(sim.url + "/v1/completions", json=body, timeout=5).status_code == 200
        nanoctrl.start()
        try:
            entity_id = f"dlengine-sim-model-127.0.0.1:{sim.port}"
            wait_until(lambda: entity_id in nanoctrl.entities(scope), 15, "never listed")
        finally:
            nanoctrl.stop()
