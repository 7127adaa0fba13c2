"""Engines joining through a control plane's registration URL (``/register/<token>/nodes/*``) with
no change to them: LMDeploy's ``api_server --proxy-url`` request exactly as it sends it, the
token's life (issued once, rotated, revoked), approval, the allow-list, and what an engine that
registers again may change."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from rest_framework.test import APIClient

from enginesim.testing import run_simulator
from nodes import admission, services
from nodes.choices import NodeState
from nodes.models import ChangeRecord, ControlPlane, Node
from tests.support.ports import free_port

pytestmark = pytest.mark.django_db

# What LMDeploy's api_server sends (engine-facts C.3): these headers, no credentials.
LMDEPLOY_HEADERS = {"HTTP_ACCEPT": "application/json"}


def lmdeploy_register(client: Client, base: str, *, port: int, role: int = 1, models: list[str] | None = None):
    """``POST {proxy_url}/nodes/add`` as ``lmdeploy serve api_server --proxy-url`` does with its
    default ``--server-name 0.0.0.0``."""
    body = {"url": f"http://0.0.0.0:{port}", "status": {"models": models or ["sim-model"], "role": role}}
    return client.post(f"{base}/nodes/add", json.dumps(body), content_type="application/json", **LMDEPLOY_HEADERS)


@pytest.fixture
def direct(system) -> tuple[ControlPlane, str]:
    """A direct-registration control plane and its registration URL's path (its token inside)."""
    plane = services.control_plane_create(actor=system, name="lab", kind="direct")
    return plane, f"/register/{plane.issued_token}"


def test_an_unmodified_lmdeploy_prefill_joins_and_its_engine_type_is_detected(client: Client, direct) -> None:
    plane, base = direct
    port = free_port()
    with run_simulator(engine="lmdeploy", role="prefill", port=port):
        response = lmdeploy_register(client, base, port=port, role=2)
    assert response.status_code == 200, response.content
    assert response.json() == {"message": "Added successfully.", "state": "active"}
    node = Node.objects.get()
    # 0.0.0.0 (the engine's bind address) became the address the registration came from.
    assert node.url == f"http://127.0.0.1:{port}"
    assert (node.role, node.engine_type, node.source, node.control_plane, node.served_models) == (
        "prefill",
        "lmdeploy",
        "engine",
        plane,
        ["sim-model"],
    )
    assert node.metadata["engine_detection"]["evidence"] == "GET /v1/models: owned_by 'lmdeploy'"
    record = ChangeRecord.objects.get(object_type="node", action="create")
    assert (record.via, record.actor_label, record.note) == (
        "register",
        "registration:lab",
        "registered from 127.0.0.1",
    )


def test_an_engine_not_listening_yet_gets_the_control_planes_engine_type_until_detected(client: Client, system) -> None:
    plane = services.control_plane_create(actor=system, name="lab", kind="direct", engine_type="vllm")
    response = lmdeploy_register(client, f"/register/{plane.issued_token}", port=free_port(), role=3)
    assert response.status_code == 200
    node = Node.objects.get()
    assert (node.engine_type, node.role, node.metadata["engine_detection"]["status"]) == ("vllm", "decode", "pending")


@pytest.mark.parametrize("path", ["nodes/add", "nodes/remove", "nodes/status"])
def test_a_wrong_token_is_a_404_like_any_unknown_url_and_nothing_is_stored(client: Client, direct, path) -> None:
    plane, _ = direct
    body = json.dumps({"url": "http://10.0.0.5:23333", "status": {"models": ["m"], "role": 1}})
    for token in ["rpr-wrong", plane.registration_token_prefix, "x" * 200]:
        response = client.generic(
            "GET" if path.endswith("status") else "POST", f"/register/{token}/{path}", body, "application/json"
        )
        assert (response.status_code, response.json()) == (404, {"error": "Not found."})
    assert client.get("/register/rpr-wrong/nodes/nothing-here").json() == {"error": "Not found."}
    assert not Node.objects.exists()


def test_a_revoked_or_replaced_token_stops_working_and_registered_nodes_stay(client: Client, direct, system) -> None:
    plane, base = direct
    assert lmdeploy_register(client, base, port=free_port()).status_code == 200
    new_token = services.control_plane_issue_token(control_plane=plane, actor=system)
    assert lmdeploy_register(client, base, port=free_port()).status_code == 404
    assert lmdeploy_register(client, f"/register/{new_token}", port=free_port()).status_code == 200
    services.control_plane_revoke_token(control_plane=plane, actor=system)
    assert lmdeploy_register(client, f"/register/{new_token}", port=free_port()).status_code == 404
    assert Node.objects.count() == 2


def test_a_disabled_control_plane_refuses_registrations(client: Client, direct, system) -> None:
    plane, base = direct
    services.control_plane_update(control_plane=plane, actor=system, enabled=False)
    response = lmdeploy_register(client, base, port=free_port())
    assert response.status_code == 403 and "disabled" in response.json()["error"]
    assert not Node.objects.exists()


def test_the_token_is_stored_hashed_and_audited_by_its_prefix_only(direct) -> None:
    plane, base = direct
    token = base.rsplit("/", 1)[1]
    assert token.startswith("rpr-") and len(token) > 40
    stored = json.dumps(list(ControlPlane.objects.values()), default=str)
    assert token not in stored
    assert plane.registration_token_hash == admission.hash_registration_token(token)
    audit = json.dumps(list(ChangeRecord.objects.filter(object_type="controlplane").values("changes", "note")))
    assert token not in audit and plane.registration_token_hash not in audit
    assert plane.registration_token_prefix in audit and "registration token issued" in audit
    assert admission.control_plane_for_token(token) == plane
    assert admission.control_plane_for_token(token + "x") is None


def test_with_manual_approval_a_registration_waits_pending_and_registering_again_keeps_it(
    client: Client, direct, system
) -> None:
    plane, base = direct
    services.control_plane_update(control_plane=plane, actor=system, approval_mode="manual")
    port = free_port()
    response = lmdeploy_register(client, base, port=port, role=2)
    assert response.json() == {"message": "Added successfully; waiting for an operator's approval.", "state": "pending"}
    assert lmdeploy_register(client, base, port=port, role=2).json()["state"] == "pending"  # the engine restarted
    node = Node.objects.get()
    assert node.state == NodeState.PENDING
    services.node_approve(node=node, actor=services.Actor("alice", "admin"))
    assert lmdeploy_register(client, base, port=port, role=2).json()["state"] == "active"


def test_a_registration_outside_the_allowed_networks_is_refused_before_the_engine_is_asked(
    client: Client, direct, system, engine_stub
) -> None:
    plane, base = direct
    services.control_plane_update(control_plane=plane, actor=system, allowed_networks=["10.0.0.0/8"])
    url, stub = engine_stub
    body = {"url": url, "status": {"role": 1}}  # no models: the engine would be asked
    response = client.post(f"{base}/nodes/add", json.dumps(body), content_type="application/json")
    assert response.status_code == 403
    assert response.json()["error"] == (
        "Registration refused: 127.0.0.1 (127.0.0.1) is outside the networks control plane 'lab' allows (10.0.0.0/8)."
    )
    assert stub.calls == [] and not Node.objects.exists()


def test_the_address_a_registration_comes_from_must_be_allowed_too(client: Client, direct, system) -> None:
    plane, base = direct
    services.control_plane_update(control_plane=plane, actor=system, allowed_networks=["10.0.0.0/8"])
    body = {"url": "http://10.0.0.5:23333", "status": {"models": ["m"], "role": 1}}
    response = client.post(f"{base}/nodes/add", json.dumps(body), content_type="application/json")
    assert response.status_code == 403
    assert "came from 127.0.0.1" in response.json()["error"]
    inside = client.post(f"{base}/nodes/add", json.dumps(body), "application/json", REMOTE_ADDR="10.9.9.9")
    assert inside.status_code == 200
    assert Node.objects.get().url == "http://10.0.0.5:23333"


def test_an_engine_cannot_take_over_a_node_it_did_not_register(client: Client, direct, system) -> None:
    _plane, base = direct
    manual = services.node_create(actor=system, url="http://127.0.0.1:23333", models=["mine"], role="decode")
    response = lmdeploy_register(client, base, port=23333, role=2)
    assert response.status_code == 409
    assert "already a node of an operator" in response.json()["error"]
    manual.refresh_from_db()
    assert (manual.role, manual.served_models, manual.control_plane) == ("decode", ["mine"], None)


def test_registering_again_updates_the_node_but_not_what_an_operator_changed(client: Client, direct) -> None:
    _plane, base = direct
    port = free_port()
    lmdeploy_register(client, base, port=port, role=2, models=["a"])
    node = Node.objects.get()
    services.node_update(node=node, actor=services.Actor("alice", "admin"), role="decode", weight=5)
    lmdeploy_register(client, base, port=port, role=1, models=["b"])
    node.refresh_from_db()
    assert (node.role, node.weight, node.served_models) == ("decode", 5, ["b"])
    assert Node.objects.count() == 1


def test_status_lists_this_control_planes_nodes_and_remove_forgets_one(client: Client, direct, system) -> None:
    _plane, base = direct
    services.node_create(actor=system, url="http://10.0.0.9:1", models=["other"])
    port = free_port()
    lmdeploy_register(client, base, port=port, role=2)
    listed = client.get(f"{base}/nodes/status").json()
    assert list(listed) == [f"http://127.0.0.1:{port}"]
    assert listed[f"http://127.0.0.1:{port}"]["role"] == 2
    assert client.post(f"{base}/nodes/remove", {"url": "http://10.0.0.9:1"}, "application/json").status_code == 404
    removed = client.post(f"{base}/nodes/remove", {"url": f"http://0.0.0.0:{port}"}, "application/json")
    assert removed.json() == {"message": "Removed successfully."}
    assert list(Node.objects.values_list("url", flat=True)) == ["http://10.0.0.9:1"]


def test_nodes_add_with_a_rest_token_also_replaces_a_bind_address(operator_api: APIClient) -> None:
    body = {"url": "http://0.0.0.0:23333", "engine_type": "lmdeploy", "status": {"models": ["m"]}}
    response = operator_api.post("/nodes/add", json.dumps(body), content_type="application/json")
    assert response.status_code == 200
    assert Node.objects.get().url == "http://127.0.0.1:23333"


# -- the token through the REST API and the admin ---------------------------------------------------


def test_the_api_shows_the_token_once_when_it_creates_a_direct_control_plane(operator_api, outsider_api) -> None:
    created = operator_api.post("/api/control-planes/", {"name": "lab", "kind": "direct"}, format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["registration_token"].startswith(body["registration_token_prefix"])
    assert body["registration_url"] == f"http://testserver/register/{body['registration_token']}"
    for api in (operator_api, outsider_api):
        again = api.get(f"/api/control-planes/{body['id']}/").json()
        assert again["registration_token"] is None and again["registration_url"] is None
    nanoctrl = operator_api.post("/api/control-planes/", {"name": "ctl", "address": "h:1"}, format="json").json()
    assert (nanoctrl["kind"], nanoctrl["registration_token"], nanoctrl["registration_token_prefix"]) == (
        "nanoctrl",
        None,
        "",
    )


def test_the_api_rotates_and_revokes_the_token_for_staff_only(operator_api, outsider_api, direct) -> None:
    plane, base = direct
    path = f"/api/control-planes/{plane.pk}/registration-token/"
    assert outsider_api.post(path).status_code == 403
    rotated = operator_api.post(path)
    assert rotated.status_code == 200
    token = rotated.json()["registration_token"]
    assert admission.control_plane_for_token(token) == plane
    assert admission.control_plane_for_token(base.rsplit("/", 1)[1]) is None
    assert operator_api.delete(path).status_code == 204
    assert admission.control_plane_for_token(token) is None


def test_the_admin_shows_the_registration_url_once_and_can_issue_and_revoke(client: Client, admin_user) -> None:
    client.force_login(admin_user)
    form = {
        "name": "lab",
        "kind": "direct",
        "address": "",
        "scope": "",
        "kinds": '["dlengine"]',
        "engine_type": "lmdeploy",
        "sync_interval": "10",
        "redis_url": "",
        "enabled": "on",
        "approval_mode": "manual",
        "allowed_networks": '["10.0.0.0/8"]',
    }
    response = client.post("/admin/nodes/controlplane/add/", form, follow=True)
    page = response.content.decode()
    assert "Copy the registration URL" in page and "--proxy-url http://testserver/register/rpr-" in page
    plane = ControlPlane.objects.get()
    assert (plane.kind, plane.approval_mode, plane.allowed_networks) == ("direct", "manual", ["10.0.0.0/8"])
    first = plane.registration_token_hash
    page = client.post(
        "/admin/nodes/controlplane/",
        {"action": "issue_registration_token", "_selected_action": [plane.pk]},
        follow=True,
    ).content.decode()
    assert "--proxy-url http://testserver/register/rpr-" in page
    plane.refresh_from_db()
    assert plane.registration_token_hash not in ("", first)
    client.post("/admin/nodes/controlplane/", {"action": "revoke_registration_token", "_selected_action": [plane.pk]})
    plane.refresh_from_db()
    assert (plane.registration_token_hash, plane.registration_token_prefix) == ("", "")


def test_a_registration_is_held_to_the_same_validation(client: Client, direct) -> None:
    _, base = direct
    for models in (["a\x00b"], ["\ud800"], ["two\nlines"]):
        body = json.dumps({"url": "http://127.0.0.1:8100", "status": {"models": models}})
        assert client.post(f"{base}/nodes/add", body, content_type="application/json").status_code == 400
    assert not Node.objects.exists()
