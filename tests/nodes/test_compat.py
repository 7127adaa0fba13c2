"""DLRouter's ``/nodes/*`` endpoints: same paths and success bodies, real errors."""

from __future__ import annotations

import json

import pytest
from rest_framework.test import APIClient

from nodes import services
from nodes.models import ChangeRecord, Node
from tests.support.ports import closed_port

pytestmark = pytest.mark.django_db


def post(client: APIClient, path: str, body) -> tuple[int, dict]:
    # DLRouter's users post with `curl -d` and no Content-Type: the body is JSON all the same.
    raw = body if isinstance(body, str) else json.dumps(body)
    response = client.post(path, raw, content_type="application/x-www-form-urlencoded")
    return response.status_code, response.json()


def test_add_creates_a_node_with_its_models_and_an_audit_record(operator_api: APIClient) -> None:
    status, body = post(
        operator_api, "/nodes/add", {"url": "http://127.0.0.1:8100", "status": {"role": "prefill", "models": ["m"]}}
    )
    assert (status, body) == (200, {"message": "Added successfully."})
    node = Node.objects.get(url="http://127.0.0.1:8100")
    assert (node.role, node.source, node.engine_type, node.served_models) == ("prefill", "manual", "nanodeploy", ["m"])
    assert ChangeRecord.objects.filter(
        via="compat", object_type="node", action="create", actor_label="operator"
    ).exists()


@pytest.mark.parametrize(("role", "expected"), [(1, "hybrid"), (2, "prefill"), (3, "decode"), ("decode", "decode")])
def test_add_accepts_numeric_and_named_roles(operator_api: APIClient, role, expected: str) -> None:
    status, _ = post(
        operator_api, "/nodes/add", {"url": "http://127.0.0.1:8100", "status": {"role": role, "models": ["m"]}}
    )
    assert status == 200
    assert Node.objects.get().role == expected


def test_add_takes_an_engine_type_at_top_level_or_in_status(operator_api: APIClient, settings) -> None:
    post(operator_api, "/nodes/add", {"url": "http://a:1", "engine_type": "vllm", "status": {"models": ["m"]}})
    post(operator_api, "/nodes/add", {"url": "http://b:1", "status": {"models": ["m"], "engine_type": "sglang"}})
    settings.ROUTERPANEL_DEFAULT_ENGINE_TYPE = "lmdeploy"
    post(operator_api, "/nodes/add", {"url": "http://c:1", "status": {"models": ["m"]}})
    assert dict(Node.objects.values_list("url", "engine_type")) == {
        "http://a:1": "vllm",
        "http://b:1": "sglang",
        "http://c:1": "lmdeploy",
    }


def test_add_without_models_asks_the_node(operator_api: APIClient, engine_stub) -> None:
    url, stub = engine_stub
    stub.models = ["Qwen3-0.6B"]
    # The engine type is given, so only the models are asked (detection: tests/nodes/test_engine_detect.py).
    status, body = post(operator_api, "/nodes/add", {"url": url, "engine_type": "vllm", "status": None})
    assert (status, body) == (200, {"message": "Added successfully."})
    assert stub.calls == ["/v1/models", "/health"]  # then probed at once: it takes traffic after a good probe
    assert Node.objects.get(url=url).served_models == ["Qwen3-0.6B"]


def test_add_without_models_fails_cleanly_when_the_node_is_unreachable(operator_api: APIClient) -> None:
    status, body = post(operator_api, "/nodes/add", {"url": f"http://127.0.0.1:{closed_port()}"})
    assert status == 400
    assert "v1/models" in body["error"]
    assert not Node.objects.exists()


def test_add_without_models_fails_cleanly_when_the_node_errors(operator_api: APIClient, engine_stub) -> None:
    url, stub = engine_stub
    stub.models_status = 500
    status, body = post(operator_api, "/nodes/add", {"url": url})
    assert status == 400
    assert "HTTP 500" in body["error"]


def test_adding_an_existing_url_updates_it_instead_of_duplicating(operator_api: APIClient) -> None:
    post(operator_api, "/nodes/add", {"url": "http://a:1", "status": {"role": 1, "models": ["m"]}})
    post(operator_api, "/nodes/add", {"url": "http://a:1/", "status": {"role": 3, "models": ["n"], "speed": 2.5}})
    node = Node.objects.get()
    assert (node.role, node.served_models, node.metadata["speed"]) == ("decode", ["n"], 2.5)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"status": {"models": ["m"]}}, "'url' is required"),
        ({"url": "127.0.0.1:8100", "status": {"models": ["m"]}}, "http:// or https://"),
        ({"url": "ftp://h:1", "status": {"models": ["m"]}}, "http:// or https://"),
        ({"url": "http://a:1", "status": {"role": "leader", "models": ["m"]}}, "unknown role"),
        ({"url": "http://a:1", "status": {"role": 7, "models": ["m"]}}, "unknown role"),
        ({"url": "http://a:1", "status": {"models": "m"}}, "list of model names"),
        ({"url": "http://a:1", "status": {"models": ["m"], "speed": "fast"}}, "number"),
        ({"url": "http://a:1", "status": "prefill"}, "object"),
        ({"url": "http://a:1", "engine_type": "tgi", "status": {"models": ["m"]}}, "engine_type"),
    ],
)
def test_add_rejects_bad_input_with_a_4xx_and_stores_nothing(operator_api: APIClient, body, message: str) -> None:
    status, response = post(operator_api, "/nodes/add", body)
    assert status == 400
    assert message in response["error"]
    assert not Node.objects.exists()


def test_compat_endpoints_need_a_token(anonymous_api: APIClient, system) -> None:
    services.node_create(actor=system, url="http://a:1", models=["m"])
    assert anonymous_api.get("/nodes/status").status_code == 401
    status, body = post(anonymous_api, "/nodes/add", {"url": "http://b:1", "status": {"models": ["m"]}})
    assert status == 401 and "error" in body
    assert anonymous_api.post("/nodes/remove", {"url": "http://a:1"}, format="json").status_code == 401
    assert Node.objects.count() == 1


def test_compat_writes_need_staff(outsider_api: APIClient, system) -> None:
    services.node_create(actor=system, url="http://a:1", models=["m"])
    assert outsider_api.get("/nodes/status").status_code == 200
    for path in ["/nodes/add", "/nodes/remove", "/nodes/terminate", "/nodes/terminate_all"]:
        status, body = post(outsider_api, path, {"url": "http://a:1", "status": {"models": ["m"]}})
        assert status == 403, path
        assert "error" in body
    assert Node.objects.count() == 1


def test_status_lists_nodes_in_dlrouter_shape(operator_api: APIClient, system) -> None:
    services.node_create(actor=system, url="http://a:1", models=["m"], role="decode", metadata={"speed": 3})
    services.node_create(actor=system, url="http://gone:1", models=["m"], state="gone")
    response = operator_api.get("/nodes/status")
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["http://a:1"]
    assert body["http://a:1"]["role"] == 3
    assert body["http://a:1"]["models"] == ["m"]
    assert body["http://a:1"]["speed"] == 3
    assert body["http://a:1"]["unfinished"] == 0


def test_remove_deletes_the_node(operator_api: APIClient, system) -> None:
    services.node_create(actor=system, url="http://a:1", models=["m"])
    assert post(operator_api, "/nodes/remove", {"url": "http://a:1/"}) == (200, {"message": "Removed successfully."})
    assert not Node.objects.exists()
    assert ChangeRecord.objects.filter(via="compat", action="delete").exists()


def test_remove_of_an_unknown_node_is_a_404(operator_api: APIClient, system) -> None:
    services.node_create(actor=system, url="http://a:1", models=["m"])
    status, body = post(operator_api, "/nodes/remove", {"url": "http://b:1"})
    assert status == 404
    assert "not registered" in body["error"]
    assert Node.objects.count() == 1


def test_terminate_calls_the_node_then_removes_it(operator_api: APIClient, engine_stub, system) -> None:
    url, stub = engine_stub
    services.node_create(actor=system, url=url, models=["m"])
    assert post(operator_api, "/nodes/terminate", {"url": url}) == (200, {"message": "Terminated successfully."})
    assert stub.calls == ["/terminate"]
    assert not Node.objects.exists()


def test_a_failed_terminate_keeps_the_node_and_is_an_error(operator_api: APIClient, engine_stub, system) -> None:
    url, stub = engine_stub
    stub.terminate_status = 500
    services.node_create(actor=system, url=url, models=["m"])
    status, body = post(operator_api, "/nodes/terminate", {"url": url})
    assert status == 502
    assert "HTTP 500" in body["error"]
    assert Node.objects.filter(url=url).exists()


def test_terminate_of_an_unknown_node_is_a_404(operator_api: APIClient) -> None:
    status, _ = post(operator_api, "/nodes/terminate", {"url": "http://nowhere:1"})
    assert status == 404


def test_terminate_all_terminates_every_node(operator_api: APIClient, engine_stub, system) -> None:
    url, stub = engine_stub
    services.node_create(actor=system, url=url, models=["m"])
    assert post(operator_api, "/nodes/terminate_all", {}) == (200, {"message": "All nodes terminated."})
    assert stub.calls == ["/terminate"]
    assert not Node.objects.exists()


def test_terminate_all_reports_the_nodes_that_failed(operator_api: APIClient, engine_stub, system) -> None:
    url, _ = engine_stub
    dead = f"http://127.0.0.1:{closed_port()}"
    services.node_create(actor=system, url=url, models=["m"])
    services.node_create(actor=system, url=dead, models=["m"])
    status, body = post(operator_api, "/nodes/terminate_all", {})
    assert status == 502
    assert body["failed"] == [dead]
    assert list(Node.objects.values_list("url", flat=True)) == [dead]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "http://127.0.0.1:8100", "status": {"models": ["a\x00b"]}}, "status.models"),
        ({"url": "http://127.0.0.1:8100", "status": {"models": ["a\x1b[2J"]}}, "status.models"),
        ({"url": "http://127.0.0.1:8100", "status": {"models": ["m"], "speed": -1}}, "status.speed"),
        ({"url": "http://my host:8100", "status": {"models": ["m"]}}, "url"),
        ({"url": "http://127.0.0.1:8100/a b", "status": {"models": ["m"]}}, "url"),
    ],
)
def test_add_refuses_what_the_rest_api_refuses(operator_api: APIClient, body: dict, field: str) -> None:
    status, answer = post(operator_api, "/nodes/add", body)
    assert status == 400 and field in answer["error"], answer
    assert not Node.objects.exists()


@pytest.mark.parametrize(
    "raw",
    [
        '{"url": "http://127.0.0.1:8100", "status": {"models": ["m"], "speed": NaN}}',
        '{"url": "http://127.0.0.1:8100", "status": {"models": ["m"], "speed": Infinity}}',
        '{"url": "http://127.0.0.1:8100", "status": {"models": ["\\ud800"]}}',
        '{"url": "http://127.0.0.1:8100", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
)
def test_add_refuses_json_nothing_can_store_with_a_400(operator_api: APIClient, raw: str) -> None:
    status, answer = post(operator_api, "/nodes/add", raw)
    assert status == 400 and "not valid JSON" in answer["error"]
    assert not Node.objects.exists()


def test_add_of_another_spelling_of_a_known_backend_updates_that_node(operator_api: APIClient) -> None:
    for url in (
        "http://127.0.0.1:8100",
        "http://localhost:8100",
        "http://2130706433:8100",
        "http://[::ffff:127.0.0.1]:8100",
    ):
        assert post(operator_api, "/nodes/add", {"url": url, "status": {"models": ["m"]}})[0] == 200
    assert list(Node.objects.values_list("url", flat=True)) == ["http://127.0.0.1:8100"]
