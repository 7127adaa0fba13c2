"""Concurrent writers: partial updates against the current row, row versions (ETag / If-Match), and
unique clashes. The parallel versions of these run through real processes in
tests/e2e/test_integrity.py."""

from __future__ import annotations

import re

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError
from django.test import Client
from rest_framework.test import APIClient

from nodes import services
from nodes.models import ChangeRecord, ModelAlias, Node

pytestmark = pytest.mark.django_db

DETAIL_BODIES = {
    "nodes": ({"url": "http://10.0.0.9:8000", "models": ["m"]}, {"weight": 7}),
    "aliases": ({"name": "gpt-4", "served_name": "m"}, {"served_name": "n"}),
    "route-policies": ({"model": "m"}, {"retry_budget": 3}),
    "control-planes": ({"name": "cp", "address": "127.0.0.1:4479"}, {"scope": "s"}),
    "api-keys": ({"name": "app"}, {"rate_limit_rpm": 60}),
}


def test_an_update_through_a_stale_instance_keeps_what_others_changed(system) -> None:
    node = services.node_create(actor=system, url="http://10.0.0.1:8000", models=["m"])
    first, second = Node.objects.get(pk=node.pk), Node.objects.get(pk=node.pk)
    services.node_update(node=first, actor=system, weight=5)
    services.node_update(node=second, actor=system, name="renamed")  # read before the weight changed
    node.refresh_from_db()
    assert (node.weight, node.name) == (5, "renamed")
    assert second.weight == 5  # the caller's instance now holds what was stored


def test_the_audit_records_the_stored_value_as_before(system) -> None:
    node = services.node_create(actor=system, url="http://10.0.0.1:8000", models=["m"])
    stale = Node.objects.get(pk=node.pk)
    services.node_update(node=node, actor=system, weight=5)
    services.node_update(node=stale, actor=system, weight=9)
    weights = [r.changes["weight"] for r in ChangeRecord.objects.filter(object_id=str(node.pk), action="update")]
    assert weights == [[5, 9], [1, 5]]  # newest first: 5 -> 9, not 1 -> 9


@pytest.mark.parametrize("collection", DETAIL_BODIES)
def test_get_answers_an_etag_that_if_match_must_carry(admin_api: APIClient, collection: str) -> None:
    create, change = DETAIL_BODIES[collection]
    created = admin_api.post(f"/api/{collection}/", create, format="json")
    assert created.status_code == 201, created.content
    url = f"/api/{collection}/{created.json()['id']}/"
    etag = admin_api.get(url)["ETag"]
    assert etag.startswith('"') and admin_api.get(url)["ETag"] == etag

    updated = admin_api.patch(url, change, format="json", HTTP_IF_MATCH=etag)
    assert updated.status_code == 200, updated.content
    assert updated["ETag"] != etag and admin_api.get(url)["ETag"] == updated["ETag"]

    stale = admin_api.patch(url, change, format="json", HTTP_IF_MATCH=etag)
    assert stale.status_code == 412
    assert "changed by someone else" in stale.json()["detail"]
    full = {**created.json(), **create, **change}
    assert admin_api.put(url, full, format="json", HTTP_IF_MATCH=etag).status_code == 412
    assert admin_api.put(url, full, format="json", HTTP_IF_MATCH="*").status_code == 200


def test_a_probe_does_not_change_a_nodes_etag(admin_api: APIClient, system) -> None:
    node = services.node_create(actor=system, url="http://10.0.0.1:8000", models=["m"])
    etag = admin_api.get(f"/api/nodes/{node.pk}/")["ETag"]
    Node.objects.filter(pk=node.pk).update(health="unhealthy", consecutive_failures=3)
    assert admin_api.get(f"/api/nodes/{node.pk}/")["ETag"] == etag


def test_a_unique_clash_found_only_by_the_database_is_a_validation_error(system, monkeypatch) -> None:
    services.alias_create(actor=system, name="gpt-4", served_name="m")

    def save_as_if_the_check_had_passed(self: ModelAlias, *args: object, **kwargs: object) -> None:
        raise IntegrityError("UNIQUE constraint failed: nodes_modelalias.name")

    monkeypatch.setattr(ModelAlias, "validate_constraints", lambda self, exclude=None: None)
    monkeypatch.setattr(ModelAlias, "save", save_as_if_the_check_had_passed)
    with pytest.raises(ValidationError, match="already exists"):
        services.alias_create(actor=system, name="gpt-4", served_name="m")


def _version_in(html: str) -> str:
    match = re.search(r'name="row_version" value="([^"]+)"', html)
    assert match is not None, "the change form carries no row version"
    return match.group(1)


def test_the_admin_refuses_to_overwrite_a_node_changed_since_its_form_was_opened(
    client: Client, admin_user, system
) -> None:
    client.force_login(admin_user)
    node = services.node_create(actor=system, url="http://10.0.0.1:8000", name="before")
    page = f"/admin/nodes/node/{node.pk}/change/"
    opened = _version_in(client.get(page).content.decode())
    services.node_update(node=node, actor=system, weight=40)  # someone else, meanwhile

    form = {
        "url": "http://10.0.0.1:8000",
        "name": "mine",
        "engine_type": "nanodeploy",
        "role": "hybrid",
        "state": "active",
        "weight": "1",
        "max_concurrency": "0",
        "bootstrap_port": "",
        "dp_size": "1",
        "kv_connector_address": "",
        "metadata": "{}",
        "aliases-TOTAL_FORMS": "0",
        "aliases-INITIAL_FORMS": "0",
        "aliases-MIN_NUM_FORMS": "0",
        "aliases-MAX_NUM_FORMS": "1000",
        "row_version": opened,
    }
    refused = client.post(page, form)
    assert (
        refused.status_code == 200
        and "Someone changed this node since you opened this page" in refused.content.decode()
    )
    node.refresh_from_db()
    assert (node.name, node.weight) == ("before", 40)

    # The form shown again carries the current version: saving again overwrites, knowingly.
    again = client.post(page, {**form, "row_version": _version_in(refused.content.decode())})
    assert again.status_code == 302
    node.refresh_from_db()
    assert (node.name, node.weight) == ("mine", 1)


def test_the_admin_saves_a_key_whose_form_is_current(client: Client, admin_user, system) -> None:
    client.force_login(admin_user)
    key, _ = services.api_key_create(actor=system, name="app")
    page = f"/admin/nodes/apikey/{key.pk}/change/"
    form = {"name": "renamed", "allowed_models": "[]", "rate_limit_rpm": "", "max_concurrent": "", "is_active": "on"}
    assert client.post(page, {**form, "row_version": "stale"}).status_code == 200
    assert client.post(page, {**form, "row_version": _version_in(client.get(page).content.decode())}).status_code == 302
    key.refresh_from_db()
    assert key.name == "renamed"
