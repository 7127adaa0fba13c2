from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from nodes import services
from nodes.models import ApiKey, ChangeRecord, ControlPlane, ModelAlias, Node, RoutePolicy, hash_api_key

pytestmark = pytest.mark.django_db

# One valid creation body per collection, used by the permission matrix.
CREATE_BODIES = {
    "/api/nodes/": {"url": "http://10.0.0.9:8000", "role": "prefill", "models": ["m"]},
    "/api/aliases/": {"name": "gpt-4", "served_name": "m"},
    "/api/route-policies/": {"model": "m", "strategy": "least_requests"},
    "/api/control-planes/": {"name": "cp", "address": "127.0.0.1:4479"},
    "/api/api-keys/": {"name": "app"},
}


@pytest.mark.parametrize("collection", [*CREATE_BODIES, "/api/changes/"])
def test_anonymous_callers_are_refused(anonymous_api: APIClient, collection: str) -> None:
    assert anonymous_api.get(collection).status_code == 401
    assert anonymous_api.post(collection, {}, format="json").status_code == 401


@pytest.mark.parametrize("collection", [*CREATE_BODIES, "/api/changes/"])
def test_outsiders_may_read_but_not_write(outsider_api: APIClient, collection: str) -> None:
    assert outsider_api.get(collection).status_code == 200
    response = outsider_api.post(collection, CREATE_BODIES.get(collection, {}), format="json")
    assert response.status_code in (403, 405)


@pytest.mark.parametrize("collection", list(CREATE_BODIES))
@pytest.mark.parametrize("persona", ["admin_api", "operator_api"])
def test_staff_may_create(request, persona: str, collection: str) -> None:
    client: APIClient = request.getfixturevalue(persona)
    response = client.post(collection, CREATE_BODIES[collection], format="json")
    assert response.status_code == 201, response.content
    assert ChangeRecord.objects.filter(via="api", action="create").exists()


def test_outsiders_cannot_change_or_delete_a_node(outsider_api: APIClient, system) -> None:
    node = services.node_create(actor=system, url="http://10.0.0.9:8000", models=["m"])
    assert outsider_api.patch(f"/api/nodes/{node.pk}/", {"weight": 9}, format="json").status_code == 403
    assert outsider_api.delete(f"/api/nodes/{node.pk}/").status_code == 403
    assert outsider_api.post(f"/api/nodes/{node.pk}/drain/").status_code == 403
    node.refresh_from_db()
    assert (node.weight, node.state) == (1, "active")


def test_drf_token_scheme_works_too(admin_user) -> None:
    from rest_framework.authtoken.models import Token

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=admin_user).key}")
    assert client.get("/api/nodes/").status_code == 200


def test_a_session_login_reads_the_api(client, outsider_user) -> None:
    client.force_login(outsider_user)
    assert client.get("/api/nodes/").status_code == 200


def test_creating_a_node_normalises_its_url_and_creates_aliases(operator_api: APIClient) -> None:
    response = operator_api.post(
        "/api/nodes/",
        {"url": "HTTP://10.0.0.9:8000/", "role": 3, "models": ["qwen"], "model_path": "/m/Qwen3-0.6B"},
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["url"] == "http://10.0.0.9:8000"
    assert body["role"] == "decode"
    assert body["served_models"] == ["qwen"]
    assert {a["name"] for a in body["aliases"]} == {"qwen", "/m/Qwen3-0.6B", "Qwen3-0.6B"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "10.0.0.9:8000"}, "url"),
        ({"url": "ftp://10.0.0.9"}, "url"),
        ({"url": "http://"}, "url"),
        ({"url": "http://10.0.0.9:8000", "role": "leader"}, "role"),
        ({"url": "http://10.0.0.9:8000", "weight": -1}, "weight"),
        ({"url": "http://10.0.0.9:8000", "engine_type": "tgi"}, "engine_type"),
        ({"url": "http://10.0.0.9:8000", "metadata": [1, 2]}, "metadata"),
        ({"url": "http://10.0.0.9:8000", "models": "m"}, "models"),
        ({"url": "http://10.0.0.9:8000", "endpoints": ["chat", "images"]}, "endpoints"),
        ({"url": "http://10.0.0.9:8000", "endpoints": "chat"}, "endpoints"),
        ({}, "url"),
    ],
)
def test_bad_node_input_is_a_400_naming_the_field(operator_api: APIClient, body: dict, field: str) -> None:
    response = operator_api.post("/api/nodes/", body, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert not Node.objects.exists()


def test_a_duplicate_url_is_refused_and_the_stored_node_is_untouched(operator_api: APIClient, system) -> None:
    node = services.node_create(actor=system, url="http://10.0.0.9:8000", models=["m"], weight=3)
    response = operator_api.post("/api/nodes/", {"url": "http://10.0.0.9:8000/", "weight": 1}, format="json")
    assert response.status_code == 400
    assert "already exists" in response.json()["url"][0]
    node.refresh_from_db()
    assert node.weight == 3


def test_malformed_json_and_wrong_content_type_are_4xx(operator_api: APIClient) -> None:
    bad_json = operator_api.post("/api/nodes/", "{not json", content_type="application/json")
    assert bad_json.status_code == 400
    wrong_type = operator_api.post("/api/nodes/", "url=http://x:1", content_type="text/plain")
    assert wrong_type.status_code == 415
    assert not Node.objects.exists()


def test_nodes_filter_by_role_state_health_model_and_engine(admin_api: APIClient, system) -> None:
    services.node_create(actor=system, url="http://a:1", role="prefill", models=["m1"], engine_type="vllm")
    services.node_create(actor=system, url="http://b:1", role="decode", models=["m2"], state="draining")
    services.node_create(actor=system, url="http://c:1", models=["m1"], health="unhealthy")
    services.alias_create(actor=system, name="friendly", served_name="m2")

    def urls(query: str) -> set[str]:
        response = admin_api.get(f"/api/nodes/?{query}")
        assert response.status_code == 200
        return {n["url"] for n in response.json()["results"]}

    assert urls("role=prefill") == {"http://a:1"}
    assert urls("state=draining") == {"http://b:1"}
    assert urls("health=unhealthy") == {"http://c:1"}
    assert urls("engine_type=vllm") == {"http://a:1"}
    assert urls("model=m1") == {"http://a:1", "http://c:1"}
    assert urls("model=friendly") == {"http://b:1"}
    assert admin_api.get("/api/nodes/?role=leader").status_code == 400


def test_drain_enable_disable_actions(operator_api: APIClient, system) -> None:
    node = services.node_create(actor=system, url="http://a:1", models=["m"])
    for verb, state in [("drain", "draining"), ("disable", "disabled"), ("enable", "active")]:
        response = operator_api.post(f"/api/nodes/{node.pk}/{verb}/")
        assert response.status_code == 200
        assert response.json()["state"] == state
    assert ChangeRecord.objects.filter(object_id=str(node.pk), via="api", action="update").count() == 3


def test_updating_and_deleting_a_node_is_audited(operator_api: APIClient, system) -> None:
    node = services.node_create(actor=system, url="http://a:1", models=["m"])
    assert (
        operator_api.patch(f"/api/nodes/{node.pk}/", {"weight": 4, "models": ["n"]}, format="json").status_code == 200
    )
    node.refresh_from_db()
    assert node.weight == 4
    assert node.served_models == ["n"]
    assert operator_api.delete(f"/api/nodes/{node.pk}/").status_code == 204
    assert not Node.objects.filter(pk=node.pk).exists()
    record = ChangeRecord.objects.filter(object_type="node", action="delete").get()
    assert record.actor_label == "operator"


def test_an_api_key_is_shown_once(operator_api: APIClient) -> None:
    created = operator_api.post("/api/api-keys/", {"name": "app", "allowed_models": ["m"]}, format="json").json()
    plaintext = created["key"]
    assert plaintext.startswith("rp-")
    key = ApiKey.objects.get(pk=created["id"])
    assert key.key_hash == hash_api_key(plaintext)
    listed = operator_api.get(f"/api/api-keys/{key.pk}/").json()
    assert listed["key"] is None
    assert plaintext not in str(operator_api.get("/api/api-keys/").content)


def test_alias_uniqueness_is_a_400(operator_api: APIClient, system) -> None:
    services.alias_create(actor=system, name="gpt-4", served_name="m")
    response = operator_api.post("/api/aliases/", {"name": "gpt-4", "served_name": "other"}, format="json")
    assert response.status_code == 400
    assert ModelAlias.objects.get(name="gpt-4").served_name == "m"


def test_the_global_policy_cannot_be_deleted_through_the_api(operator_api: APIClient) -> None:
    policy = RoutePolicy.objects.get(model="")
    response = operator_api.delete(f"/api/route-policies/{policy.pk}/")
    assert response.status_code == 400
    assert RoutePolicy.objects.filter(pk=policy.pk).exists()


@pytest.mark.parametrize(
    "body",
    [
        {"name": "cp", "address": "127.0.0.1:4479", "redis_url": "http://nope"},
        {"name": "cp", "address": "127.0.0.1:4479", "kinds": "nanodeploy"},
        {"name": "cp", "address": "127.0.0.1:4479", "sync_interval": 0},
        {"name": "cp", "address": ""},
    ],
)
def test_bad_control_plane_input_is_a_400(operator_api: APIClient, body: dict) -> None:
    assert operator_api.post("/api/control-planes/", body, format="json").status_code == 400
    assert not ControlPlane.objects.exists()


def test_bad_policy_timeouts_are_a_400(operator_api: APIClient) -> None:
    body = {"model": "m", "first_token_timeout": 100, "total_timeout": 10}
    response = operator_api.post("/api/route-policies/", body, format="json")
    assert response.status_code == 400
    assert "first_token_timeout" in response.json()


def test_the_openapi_schema_and_docs_are_served(admin_api: APIClient, client, admin_user) -> None:
    schema = admin_api.get("/api/schema/?format=json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert "/api/nodes/" in paths and "/api/nodes/{id}/drain/" in paths and "/nodes/add" in paths
    client.force_login(admin_user)
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    assert b"swagger-ui" in docs.content


def test_unmatched_api_urls_answer_json_404(admin_api: APIClient) -> None:
    response = admin_api.get("/api/nodes/0.5/")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}


def test_a_proxy_api_key_does_not_open_the_rest_api_or_the_dlrouter_endpoints(system) -> None:
    _, plaintext = services.api_key_create(actor=system, name="app")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    assert client.get("/api/nodes/").status_code == 401
    assert client.get("/nodes/status").status_code == 401


@pytest.mark.parametrize(
    "raw",
    [
        b'{"url": "http://10.0.0.9:8000", "models": ["m"], "weight": NaN}',
        b'{"url": "http://10.0.0.9:8000", "models": ["\\ud800"]}',
        b'{"url": "http://10.0.0.9:8000", "models": ["m"], "metadata": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001,
        b'{"url": "http://10.0.0.9:8000", "models": ["m"], "metadata": {"a": "\\u0000"}}',
        b'{"url": "http://10.0.0.9:8000", "models": ["m"], "weight": 1e400}',
        b'{"url": "http://my host:8000", "models": ["m"]}',
    ],
)
def test_bodies_nothing_could_store_are_a_400_naming_the_problem(admin_api: APIClient, raw: bytes) -> None:
    response = admin_api.generic("POST", "/api/nodes/", raw, content_type="application/json")
    assert response.status_code == 400, response.content
    assert not Node.objects.exists()


def test_a_number_field_refuses_true(admin_api: APIClient) -> None:
    response = admin_api.post("/api/route-policies/", {"model": "m", "connect_timeout": True}, format="json")
    assert response.status_code == 400


def test_a_limit_beyond_any_page_is_the_largest_page(admin_api: APIClient) -> None:
    for query in ("limit=99999999999999999999", "offset=99999999999999999999", f"limit={'9' * 5000}"):
        assert admin_api.get(f"/api/route-policies/?{query}").status_code == 200


def test_a_url_spelled_another_way_names_the_node_that_has_it(admin_api: APIClient, system) -> None:
    node = services.node_create(actor=system, url="http://127.0.0.1:8000", models=["m"])
    response = admin_api.post("/api/nodes/", {"url": "http://localhost:8000", "models": ["m"]}, format="json")
    assert response.status_code == 400
    assert response.json()["url"] == [
        f"A node with URL http://127.0.0.1:8000 already exists: node {node.pk} "
        "(http://localhost:8000 is written http://127.0.0.1:8000)."
    ]


def test_a_node_says_which_endpoints_it_serves(operator_api: APIClient) -> None:
    body = {"url": "http://10.0.0.9:8000", "engine_type": "vllm", "endpoints": ["embeddings", "rerank"]}
    response = operator_api.post("/api/nodes/", body, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["endpoints"] == ["embeddings", "rerank"]
    node = Node.objects.get()
    assert node.endpoints == ["embeddings", "rerank"]
    patched = operator_api.patch(f"/api/nodes/{node.pk}/", {"endpoints": []}, format="json")
    assert patched.status_code == 200 and patched.json()["endpoints"] == []  # empty: the engine type's default
