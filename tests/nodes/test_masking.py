"""Passwords in URLs are masked for non-staff readers, in the audit trail, in errors and in logs."""

from __future__ import annotations

import json

import pytest
from django.apps import apps
from rest_framework.test import APIClient

from nodes import services
from nodes.masking import mask_credentials
from nodes.models import ChangeRecord, ControlPlane, Node
from nodes.registry import NanoCtrlClient, RegistryError
from tests.support.ports import free_port

SECRET = "s3cret-Pa55"
REDIS_URL = f"redis://default:{SECRET}@10.0.0.9:6379/0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (REDIS_URL, "redis://default:***@10.0.0.9:6379/0"),
        (f"redis://:{SECRET}@h:6379", "redis://:***@h:6379"),
        (f"rediss://u:{SECRET}@h", "rediss://u:***@h"),
        ("https://TOKEN123@ctrl:4479", "https://***@ctrl:4479"),
        (f"'http://u:{SECRET}@h:1' must not carry credentials.", "'http://u:***@h:1' must not carry credentials."),
        (f"two: redis://a:{SECRET}@x and http://b:{SECRET}@y/p", "two: redis://a:***@x and http://b:***@y/p"),
        ("redis://10.0.0.9:6379/0", "redis://10.0.0.9:6379/0"),
        ("user@example.com wrote http://h/a@b", "user@example.com wrote http://h/a@b"),
        ("", ""),
    ],
)
def test_it_masks_the_password_of_every_url_in_a_text(text: str, expected: str) -> None:
    assert mask_credentials(text) == expected


@pytest.mark.django_db
def test_non_staff_readers_see_the_redis_url_and_address_masked(outsider_api, operator_api, system) -> None:
    plane = services.control_plane_create(
        actor=system, name="cp", address=f"http://ctl:{SECRET}@10.0.0.9:4479", redis_url=REDIS_URL
    )
    for response in (outsider_api.get("/api/control-planes/"), outsider_api.get(f"/api/control-planes/{plane.pk}/")):
        assert response.status_code == 200
        assert SECRET not in response.content.decode()
    row = outsider_api.get(f"/api/control-planes/{plane.pk}/").json()
    assert row["redis_url"] == "redis://default:***@10.0.0.9:6379/0"
    assert row["address"] == "http://ctl:***@10.0.0.9:4479"
    # Staff edit the control plane, so they see what they would change.
    assert operator_api.get(f"/api/control-planes/{plane.pk}/").json()["redis_url"] == REDIS_URL


@pytest.mark.django_db
def test_the_audit_trail_never_stores_the_password_but_records_that_it_changed(operator_api, admin_api) -> None:
    created = operator_api.post("/api/control-planes/", {"name": "cp", "address": "h:1", "redis_url": REDIS_URL})
    assert created.status_code == 201, created.content
    new_url = "redis://default:0ther-secret@10.0.0.9:6379/0"
    changed = operator_api.patch(f"/api/control-planes/{created.json()['id']}/", {"redis_url": new_url}, format="json")
    assert changed.status_code == 200
    records = ChangeRecord.objects.filter(object_type="controlplane").order_by("id")
    stored = json.dumps([r.changes for r in records])
    assert SECRET not in stored and "0ther-secret" not in stored
    assert records.last().changes["redis_url"] == ["redis://default:***@10.0.0.9:6379/0"] * 2
    listed = admin_api.get("/api/changes/", {"object_type": "controlplane"}).content.decode()
    assert SECRET not in listed and "0ther-secret" not in listed


@pytest.mark.django_db
def test_a_migration_masks_the_passwords_already_in_the_audit_trail(system) -> None:
    from importlib import import_module

    plane = ControlPlane.objects.create(name="old", address="h:1", redis_url=REDIS_URL)
    ChangeRecord.objects.create(
        actor_label="old",
        via="admin",
        action="create",
        object_type="controlplane",
        object_id=str(plane.pk),
        object_repr="old",
        changes={"redis_url": [None, REDIS_URL], "kinds": [None, ["dlengine"]]},
    )
    import_module("nodes.migrations.0004_mask_audit_secrets").mask_audit_trail(apps, None)
    record = ChangeRecord.objects.get(object_id=str(plane.pk))
    assert record.changes == {"redis_url": [None, "redis://default:***@10.0.0.9:6379/0"], "kinds": [None, ["dlengine"]]}


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/nodes/add", "/api/nodes/"])
def test_node_url_errors_do_not_echo_a_password(operator_api: APIClient, path: str) -> None:
    body = {"url": f"http://user:{SECRET}@10.0.0.5:8000", "status": {"models": ["m"]}, "models": ["m"]}
    response = operator_api.post(path, json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    text = response.content.decode()
    assert SECRET not in text and "user:***@10.0.0.5:8000" in text
    assert not Node.objects.exists()


def test_a_registry_error_names_the_nanoctrl_address_without_its_password() -> None:
    client = NanoCtrlClient(f"http://ctl:{SECRET}@127.0.0.1:{free_port()}", timeout=1.0)
    with pytest.raises(RegistryError) as raised:
        client.list_entities(kind="dlengine", scope="")
    assert SECRET not in str(raised.value) and "ctl:***@127.0.0.1" in str(raised.value)
