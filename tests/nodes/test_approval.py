"""Approving pending nodes: the service, the REST API's action, the admin's action; pending nodes
are probed (an operator sees their health before approving) and shown with their own badge."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from rest_framework.test import APIClient

from nodes import services
from nodes.choices import NodeState
from nodes.models import ChangeRecord, Node

pytestmark = pytest.mark.django_db


@pytest.fixture
def pending(system) -> Node:
    return services.node_create(actor=system, url="http://10.0.0.5:8000", models=["m"], state=NodeState.PENDING)


def test_approving_a_pending_node_makes_it_active_audited_and_bumps_the_version(pending, system) -> None:
    version = services.config_version_current()
    services.node_approve(node=pending, actor=services.Actor("alice", "admin"))
    pending.refresh_from_db()
    assert pending.state == NodeState.ACTIVE
    assert services.config_version_current() == version + 1
    record = ChangeRecord.objects.filter(object_id=str(pending.pk), action="update").get()
    assert (record.actor_label, record.note, record.changes["state"]) == ("alice", "approved", ["pending", "active"])


def test_only_a_pending_node_can_be_approved(system) -> None:
    node = services.node_create(actor=system, url="http://10.0.0.5:8000", models=["m"], state=NodeState.DISABLED)
    with pytest.raises(ValidationError):
        services.node_approve(node=node, actor=system)
    node.refresh_from_db()
    assert node.state == NodeState.DISABLED


def test_the_rest_api_approves_a_pending_node(operator_api: APIClient, outsider_api: APIClient, pending) -> None:
    assert outsider_api.post(f"/api/nodes/{pending.pk}/approve/").status_code == 403
    response = operator_api.post(f"/api/nodes/{pending.pk}/approve/")
    assert response.status_code == 200
    assert response.json()["state"] == "active"
    again = operator_api.post(f"/api/nodes/{pending.pk}/approve/")
    assert again.status_code == 400
    assert "not pending" in again.json()["state"][0]


def test_the_rest_api_lists_pending_nodes(operator_api: APIClient, pending, system) -> None:
    services.node_create(actor=system, url="http://10.0.0.6:8000", models=["m"])
    listed = operator_api.get("/api/nodes/", {"state": "pending"}).json()["results"]
    assert [n["url"] for n in listed] == ["http://10.0.0.5:8000"]


def test_the_admin_approves_the_pending_nodes_it_is_given_and_leaves_the_others(
    client: Client, admin_user, pending, system
) -> None:
    active = services.node_create(actor=system, url="http://10.0.0.6:8000", models=["m"])
    client.force_login(admin_user)
    listed = client.get("/admin/nodes/node/?state__exact=pending").content.decode()
    assert "http://10.0.0.5:8000" in listed and "http://10.0.0.6:8000" not in listed
    assert ">Pending approval<" in listed
    response = client.post(
        "/admin/nodes/node/", {"action": "approve_nodes", "_selected_action": [pending.pk, active.pk]}, follow=True
    )
    assert "Approved 1 node(s); 1 selected node(s) were not pending" in response.content.decode()
    assert set(Node.objects.values_list("state", flat=True)) == {NodeState.ACTIVE}


def test_pending_nodes_are_probed_so_an_operator_sees_their_health(engine_stub, system, redis_url) -> None:
    url, _ = engine_stub
    node = services.node_create(actor=system, url=url, models=["m"], state=NodeState.PENDING)
    assert services.health_check_nodes().checked == 1
    node.refresh_from_db()
    assert (node.state, node.health) == (NodeState.PENDING, "healthy")


def test_the_dashboard_shows_pending_with_its_label_and_colour() -> None:
    from dashboard.payload import page_config

    state = page_config(data_path="/dashboard/data")["choices"]["state"]
    assert state["pending"] == {"label": "Pending approval", "colour": NodeState.colour("pending")}
