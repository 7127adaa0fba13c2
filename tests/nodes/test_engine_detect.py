"""Detecting a node's engine type from its own endpoints (``nodes/engine_detect.py``): against the
simulator's flavours, against stand-ins for engines that do not name themselves, through
``/nodes/add`` and the REST API, and later by the health checker for a node that was not
listening yet when it was added."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from rest_framework.test import APIClient

from enginesim.testing import run_simulator
from nodes import engine_detect, services
from nodes.models import ChangeRecord, Node
from tests.support.ports import free_port


@pytest.mark.parametrize(
    ("flavour", "expected", "evidence"),
    [
        ("vllm", "vllm", "owned_by 'vllm'"),
        ("sglang", "sglang", "owned_by 'sglang'"),
        ("lmdeploy", "lmdeploy", "owned_by 'lmdeploy'"),
        ("nanodeploy", "nanodeploy", "owned_by 'dlengine'"),
        ("dlengine", "nanodeploy", "owned_by 'dlengine'"),
        ("openai", "openai", "plain OpenAI server"),
    ],
)
def test_it_detects_each_simulated_engine(flavour: str, expected: str, evidence: str) -> None:
    with run_simulator(engine=flavour) as sim:
        found = engine_detect.detect(sim.url, timeout=2.0)
    assert found.engine_type == expected
    assert evidence in found.evidence
    assert found.models == ["sim-model"]


class Routes(dict):
    """path -> (status, JSON body) a stand-in engine answers; anything else is a 404."""


@pytest.fixture
def stand_in() -> Iterator[tuple[str, Routes]]:
    """An engine that does not name itself in ``owned_by`` (a fork or a wrapper)."""
    routes = Routes({"/v1/models": (200, {"object": "list", "data": [{"id": "m", "owned_by": "acme"}]})})

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            status, body = routes.get(self.path, (404, {"detail": "Not Found"}))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()


ENGINE_INFO = {"tp_size": 1, "ep_size": 1, "dp_size": 1, "pp_size": None, "dp_rank": 0, "block_size": 64}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"/server_info": (200, {"model_path": "/m", "tp_size": 1, "version": "0.5.23"})}, "sglang"),
        ({"/get_server_info": (200, {"model_path": "/m", "version": "0.4.0"})}, "sglang"),
        ({"/distserve/engine_info": (200, json.dumps({**ENGINE_INFO, "num_gpu_blocks": 10}))}, "lmdeploy"),
        ({"/pd/free": (405, {"detail": "Method Not Allowed"})}, "nanodeploy"),
        ({"/version": (200, {"version": "0.32.0"})}, "vllm"),
        # vLLM in development mode has a /server_info, without SGLang's model_path.
        ({"/server_info": (200, {"vllm_config": "..."}), "/version": (200, {"version": "0.32.0"})}, "vllm"),
        ({"/version": (200, {"version": "0.5.23"}), "/server_info": (200, {"model_path": "/m"})}, "sglang"),
        ({}, "openai"),
    ],
)
def test_engines_that_do_not_name_themselves_are_told_by_their_own_endpoints(stand_in, extra, expected) -> None:
    url, routes = stand_in
    routes.update(extra)
    assert engine_detect.detect(url, timeout=2.0).engine_type == expected


def test_an_engine_without_a_model_list_is_still_told_by_its_endpoints(stand_in) -> None:
    url, routes = stand_in
    routes.update({"/v1/models": (500, {}), "/version": (200, {"version": "0.32.0"})})
    found = engine_detect.detect(url, timeout=2.0)
    assert (found.engine_type, found.models) == ("vllm", None)


def test_a_node_that_does_not_answer_gets_the_fallback_marked_pending() -> None:
    choice = engine_detect.choose_engine_type(f"http://127.0.0.1:{free_port()}", fallback="sglang", timeout=1.0)
    assert (choice.engine_type, choice.pending, choice.unreachable) == ("sglang", True, True)
    assert "could not reach" in choice.detection["evidence"]


# -- through the interfaces ----------------------------------------------------------------------


def post(client: APIClient, path: str, body: dict) -> Any:
    return client.post(path, json.dumps(body), content_type="application/json")


@pytest.mark.django_db
def test_nodes_add_without_an_engine_type_detects_it(operator_api: APIClient) -> None:
    with run_simulator(engine="vllm", role="decode") as sim:
        response = post(operator_api, "/nodes/add", {"url": sim.url, "status": {"role": 3}})
    assert response.status_code == 200, response.content
    node = Node.objects.get(url=sim.url)
    assert (node.engine_type, node.role, node.served_models) == ("vllm", "decode", ["sim-model"])
    assert node.metadata["engine_detection"] == {"status": "detected", "evidence": "GET /v1/models: owned_by 'vllm'"}


@pytest.mark.django_db
def test_the_rest_api_detects_the_engine_type_when_it_is_not_given(operator_api: APIClient, settings) -> None:
    settings.ROUTERPANEL_DEFAULT_ENGINE_TYPE = "vllm"
    with run_simulator(engine="sglang") as sim:
        detected = operator_api.post("/api/nodes/", {"url": sim.url, "models": ["sim-model"]}, format="json")
        given = operator_api.post(
            "/api/nodes/", {"url": sim.url + "/x", "models": ["m"], "engine_type": "lmdeploy"}, format="json"
        )
    assert detected.status_code == 201 and given.status_code == 201
    assert detected.json()["engine_type"] == "sglang"
    assert given.json()["engine_type"] == "lmdeploy" and "engine_detection" not in given.json()["metadata"]
    unreachable = operator_api.post(
        "/api/nodes/", {"url": f"http://127.0.0.1:{free_port()}", "models": ["m"]}, format="json"
    )
    assert unreachable.json()["engine_type"] == "vllm"  # the configured default, the last resort
    assert unreachable.json()["metadata"]["engine_detection"]["status"] == "pending"


@pytest.mark.django_db
def test_the_rest_api_refuses_a_bind_address_before_probing_anything(operator_api: APIClient) -> None:
    response = operator_api.post("/api/nodes/", {"url": "http://0.0.0.0:8000", "models": ["m"]}, format="json")
    assert response.status_code == 400
    assert "binds to" in response.json()["url"][0]


@pytest.mark.django_db
def test_the_health_checker_detects_the_type_once_a_pending_node_answers(operator_api, redis_url, settings) -> None:
    settings.ROUTERPANEL_DEFAULT_ENGINE_TYPE = "nanodeploy"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    response = post(operator_api, "/nodes/add", {"url": url, "status": {"role": 2, "models": ["sim-model"]}})
    assert response.status_code == 200
    node = Node.objects.get(url=url)
    assert node.engine_type == "nanodeploy" and engine_detect.detection_pending(node.metadata)
    assert services.health_check_nodes().checked == 1  # not listening yet: nothing to detect
    with run_simulator(engine="lmdeploy", role="prefill", port=port):
        report = services.health_check_nodes()
    node.refresh_from_db()
    assert node.engine_type == "lmdeploy"
    assert node.metadata["engine_detection"]["status"] == "detected"
    assert any("engine type lmdeploy" in t for t in report.transitions)
    record = ChangeRecord.objects.filter(object_id=str(node.pk), actor_label="health-check").first()  # newest
    assert record.changes["engine_type"] == ["nanodeploy", "lmdeploy"]


@pytest.mark.django_db
def test_an_operators_engine_type_wins_over_a_later_detection(operator_api, redis_url) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    post(operator_api, "/nodes/add", {"url": url, "status": {"models": ["sim-model"]}})
    node = Node.objects.get(url=url)
    assert engine_detect.detection_pending(node.metadata)
    operator_api.patch(f"/api/nodes/{node.pk}/", {"engine_type": "sglang"}, format="json")
    with run_simulator(engine="vllm", port=port):
        services.health_check_nodes()
    node.refresh_from_db()
    assert node.engine_type == "sglang"
    assert "engine_detection" not in node.metadata


POOLING = ["detokenize", "embeddings", "rerank", "score", "tokenize"]


@pytest.mark.django_db
def test_a_vllm_pooling_server_is_detected_with_the_endpoints_it_serves(operator_api: APIClient) -> None:
    with (
        run_simulator(engine="vllm") as generation,
        run_simulator(engine="vllm", extra_args=["--runner", "pooling"]) as pooling,
        run_simulator(engine="vllm", extra_args=["--runner", "pooling"]) as other,
    ):
        assert engine_detect.detect(generation.url, timeout=2.0).endpoints is None  # vLLM's default
        assert engine_detect.detect(pooling.url, timeout=2.0).endpoints == POOLING
        added = post(operator_api, "/nodes/add", {"url": pooling.url, "status": {"role": 1}})
        created = operator_api.post("/api/nodes/", {"url": other.url, "models": ["m"]}, format="json")
        given = operator_api.post(
            "/api/nodes/", {"url": pooling.url + "/q", "models": ["m"], "endpoints": ["embeddings"]}, format="json"
        )
    assert added.status_code == 200 and Node.objects.get(url=pooling.url).endpoints == POOLING
    assert created.status_code == 201 and created.json()["endpoints"] == POOLING
    assert given.status_code == 201 and given.json()["endpoints"] == ["embeddings"]  # the operator's list wins


def test_answers_that_are_not_fastapis_keep_the_default(stand_in) -> None:
    url, routes = stand_in
    routes.update({"/v1/models": (200, {"object": "list", "data": [{"id": "m", "owned_by": "vllm"}]})})
    routes.update({path: (401, {}) for path in ("/v1/chat/completions", "/v1/embeddings")})
    assert engine_detect.detect(url, timeout=2.0).endpoints is None
