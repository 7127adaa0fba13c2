"""Injected faults and cancellation counting, through real sockets."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from enginesim.testing import Simulator, run_simulator


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    """A simulator with visible pacing (20 ms per token) so streams can be cut in the middle."""
    with run_simulator(ttft_ms=1, itl_ms=20) as sim:
        yield sim


@pytest.fixture(autouse=True)
def _reset(sim: Simulator) -> None:
    sim.reset()


def complete(sim: Simulator, prompt: str = "hi", timeout: float = 10.0, **fields) -> httpx.Response:
    body = {"model": "sim-model", "prompt": prompt, **fields}
    return httpx.post(sim.url + "/v1/completions", json=body, timeout=timeout)


def test_an_error_fault_answers_its_status_for_the_next_count_requests_then_stops(sim):
    sim.set_faults(error_rate=1.0, error_status=503, count=2)
    statuses = [complete(sim).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    sim.set_faults(error_rate=1.0, error_status=429)
    response = complete(sim)
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and "injected" in error["message"]
    assert sim.stats()["requests"]["faults_injected"] == 3


def test_faults_can_be_read_back_and_cleared(sim):
    sim.set_faults(error_rate=0.5, error_status=500)
    assert httpx.get(sim.url + "/sim/faults").json()["error_rate"] == 0.5
    httpx.delete(sim.url + "/sim/faults")
    assert httpx.get(sim.url + "/sim/faults").json()["error_rate"] == 0.0
    assert complete(sim).status_code == 200


def test_an_unknown_fault_is_rejected_with_400(sim):
    response = httpx.post(sim.url + "/sim/faults", json={"explode": True})
    assert response.status_code == 400
    assert "explode" in response.json()["error"]["message"]


def test_a_hung_request_never_answers_and_counts_as_cancelled_when_the_client_leaves(sim):
    sim.set_faults(hang=True, count=1)
    with pytest.raises(httpx.ReadTimeout):
        complete(sim, timeout=0.5)
    stats = sim.wait_for(lambda s: s["requests"]["cancelled"] == 1)
    assert stats["requests"]["in_flight"] == 0
    assert complete(sim).status_code == 200


def test_a_slow_first_token_delays_the_answer(sim):
    sim.set_faults(slow_first_token_ms=400, count=1)
    response = complete(sim, max_tokens=1)
    assert response.status_code == 200
    assert response.elapsed.total_seconds() >= 0.4


def test_a_client_leaving_during_the_first_token_wait_is_counted_as_cancelled(sim):
    sim.set_faults(slow_first_token_ms=30_000, count=1)
    with pytest.raises(httpx.ReadTimeout):
        complete(sim, timeout=0.3)
    sim.wait_for(lambda s: s["requests"]["cancelled"] == 1 and s["requests"]["in_flight"] == 0)


def test_a_client_leaving_mid_stream_is_counted_as_cancelled(sim):
    body = {"model": "sim-model", "prompt": "[[len=200]] long", "stream": True}
    with httpx.stream("POST", sim.url + "/v1/completions", json=body, timeout=10) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    sim.wait_for(lambda s: s["requests"]["cancelled"] == 1 and s["requests"]["in_flight"] == 0)
    assert sim.stats()["requests"]["completed"] == 0


def test_a_finished_request_is_not_counted_as_cancelled(sim):
    complete(sim, "[[len=3]] a", stream=True)
    complete(sim, "[[len=3]] b")
    requests = sim.stats()["requests"]
    assert (requests["completed"], requests["cancelled"]) == (2, 0)


def test_close_after_chunks_drops_the_connection_after_k_events(sim):
    sim.set_faults(close_after_chunks=3, count=1)
    events = []
    body = {"model": "sim-model", "prompt": "[[len=50]] x", "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):  # noqa: SIM117 - the error comes from reading the body
        with httpx.stream("POST", sim.url + "/v1/completions", json=body, timeout=10) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
    assert len(events) == 3
    assert "[DONE]" not in events[-1]
    assert sim.stats()["requests"]["aborted"] == 1


def test_close_after_chunks_on_a_non_streaming_request_closes_without_an_answer(sim):
    sim.set_faults(close_after_chunks=0, count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        complete(sim)
    assert complete(sim).status_code == 200


def test_fail_health_makes_health_checks_fail_until_cleared(sim):
    sim.set_faults(fail_health=True)
    assert httpx.get(sim.url + "/health").status_code == 503
    assert complete(sim).status_code == 200  # only the health check fails
    sim.set_faults()
    assert httpx.get(sim.url + "/health").status_code == 200


def test_refuse_connections_refuses_new_connections_while_open_ones_still_work(sim):
    with httpx.Client(base_url=sim.url, timeout=10) as admin:
        assert admin.post("/sim/faults", json={"refuse_connections": True}).status_code == 200
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((sim.host, sim.port), timeout=2).close()
        with pytest.raises(httpx.ConnectError):
            httpx.get(sim.url + "/health", timeout=2)
        assert admin.post("/sim/faults", json={}).status_code == 200  # the kept-alive connection
    assert httpx.get(sim.url + "/health").status_code == 200


def test_a_crash_fault_kills_the_process_on_the_next_request():
    with run_simulator() as doomed:
        doomed.set_faults(crash=True)
        with pytest.raises(httpx.TransportError):
            complete(doomed)
        assert doomed.proc.wait(timeout=10) != 0


def test_error_faults_from_the_command_line_apply_from_the_start():
    with run_simulator(extra_args=["--error-rate=1", "--error-status=500"]) as failing:
        response = complete(failing)
        assert response.status_code == 500
        assert json.loads(response.text)["error"]["type"] == "server_error"
