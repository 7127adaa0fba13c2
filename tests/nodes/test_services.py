from __future__ import annotations

import pytest
import redis
from django.core.exceptions import ValidationError

from nodes import services
from nodes.choices import AliasOrigin, ChangeVia, NodeSource, NodeState
from nodes.models import ChangeRecord, ModelAlias, Node, RoutePolicy
from tests.support.ports import closed_port

pytestmark = pytest.mark.django_db


def test_every_routing_write_bumps_the_configuration_version(system) -> None:
    start = services.config_version_current()
    node = services.node_create(actor=system, url="http://127.0.0.1:8100", models=["m"])
    after_create = services.config_version_current()
    assert after_create > start

    services.node_drain(node=node, actor=system)
    after_drain = services.config_version_current()
    assert after_drain == after_create + 1

    services.policy_update(policy=RoutePolicy.objects.get(model=""), actor=system, strategy="least_requests")
    assert services.config_version_current() == after_drain + 1


def test_a_save_that_changes_nothing_keeps_the_version_and_records_nothing(system) -> None:
    node = services.node_create(actor=system, url="http://127.0.0.1:8100", models=["m"])
    version = services.config_version_current()
    records = ChangeRecord.objects.count()
    services.node_update(node=node, actor=system, weight=node.weight)
    assert services.config_version_current() == version
    assert ChangeRecord.objects.count() == records


def test_the_version_is_published_on_redis_after_commit(
    system, redis_url: str, settings, django_capture_on_commit_callbacks
) -> None:
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    pubsub.subscribe(settings.ROUTERPANEL_CONFIG_CHANNEL)
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.node_create(actor=system, url="http://127.0.0.1:8100")
    version = services.config_version_current()
    assert client.get(f"{settings.ROUTERPANEL_CONFIG_CHANNEL}:version") is None  # nothing before the commit
    for callback in callbacks:
        callback()

    assert int(client.get(f"{settings.ROUTERPANEL_CONFIG_CHANNEL}:version")) == version
    published = []
    while (message := pubsub.get_message(timeout=1)) is not None:
        published.append(int(message["data"]))
    assert published and published[-1] == version
    pubsub.close()


def test_a_redis_outage_does_not_fail_a_write(system, settings) -> None:
    settings.ROUTERPANEL_REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    node = services.node_create(actor=system, url="http://127.0.0.1:8100")
    assert Node.objects.filter(pk=node.pk).exists()


def test_changes_are_audited_with_actor_interface_and_diff(system) -> None:
    node = services.node_create(actor=system, url="http://127.0.0.1:8100", models=["m"])
    services.node_update(node=node, actor=services.Actor("deploy-bot", ChangeVia.API), weight=5)
    record = ChangeRecord.objects.filter(object_type="node", action="update").first()
    assert record.actor_label == "deploy-bot"
    assert record.via == ChangeVia.API
    assert record.changes == {"weight": [1, 5]}
    assert ChangeRecord.objects.filter(object_type="node", action="create", object_id=str(node.pk)).exists()
    assert ChangeRecord.objects.filter(object_type="modelalias", action="create").exists()


def test_a_failed_validation_stores_nothing(system) -> None:
    records = ChangeRecord.objects.count()
    with pytest.raises(ValidationError):
        services.node_create(actor=system, url="ftp://nope", models=["m"])
    assert not Node.objects.exists()
    assert ChangeRecord.objects.count() == records


def test_node_set_models_replaces_served_aliases_and_keeps_operator_ones(system) -> None:
    node = services.node_create(actor=system, url="http://127.0.0.1:8100", models=["old"])
    services.alias_create(actor=system, node=node, name="nickname", served_name="old", origin=AliasOrigin.OPERATOR)
    services.node_set_models(node=node, actor=system, models=["qwen"], model_path="/models/Qwen3-0.6B")
    names = dict(ModelAlias.objects.filter(node=node).values_list("name", "origin"))
    assert names == {
        "qwen": AliasOrigin.SERVED,
        "/models/Qwen3-0.6B": AliasOrigin.PATH,
        "Qwen3-0.6B": AliasOrigin.BASENAME,
        "nickname": AliasOrigin.OPERATOR,
    }


def test_upsert_revives_a_gone_node_and_updates_its_role(system) -> None:
    node = services.node_create(actor=system, url="http://127.0.0.1:8100", models=["m"], state=NodeState.GONE)
    again, created = services.node_upsert(actor=system, url="http://127.0.0.1:8100/", models=["m"], role="decode")
    assert not created
    assert again.pk == node.pk
    again.refresh_from_db()
    assert (again.state, again.role) == (NodeState.ACTIVE, "decode")


def test_operator_edits_on_registry_nodes_are_remembered_for_the_sync(system) -> None:
    node = services.node_create(actor=system, url="http://127.0.0.1:8100", source=NodeSource.REGISTRY)
    operator = services.Actor("alice", ChangeVia.ADMIN)
    services.node_update(node=node, actor=operator, weight=7, state=NodeState.DISABLED)
    node.refresh_from_db()
    assert set(node.operator_fields) == {"weight", "state"}
    # The sync's own writes are not operator edits.
    services.node_update(node=node, actor=services.Actor("sync", ChangeVia.SYNC), role="prefill")
    node.refresh_from_db()
    assert "role" not in node.operator_fields


def test_the_global_default_policy_cannot_be_deleted(system) -> None:
    with pytest.raises(ValidationError):
        services.policy_delete(policy=RoutePolicy.objects.get(model=""), actor=system)
    assert RoutePolicy.objects.filter(model="").exists()


def test_api_keys_store_only_a_hash(system) -> None:
    key, plaintext = services.api_key_create(actor=system, name="app")
    assert plaintext.startswith("rp-") and len(plaintext) > 40
    key.refresh_from_db()
    assert plaintext not in (key.key_hash, key.prefix)
    assert key.prefix == plaintext[:10]


def test_key_usage_recorded_by_the_proxy_reaches_the_database(system, redis_url) -> None:
    key, _ = services.api_key_create(actor=system, name="app")
    records = ChangeRecord.objects.count()
    redis.Redis.from_url(redis_url).hset("routerpanel:keys-last-used", str(key.pk), "1700000000.5")
    assert services.api_key_record_usage() == 1
    key.refresh_from_db()
    assert key.last_used_at.timestamp() == 1700000000.5
    assert services.api_key_record_usage() == 0  # not newer: nothing to do
    assert ChangeRecord.objects.count() == records  # bookkeeping, not audited


def test_two_spellings_of_one_backend_are_one_node(system) -> None:
    node = services.node_create(actor=system, url="http://localhost:8100", models=["m"], name="first")
    assert node.url == "http://127.0.0.1:8100"
    with pytest.raises(ValidationError, match=f"already exists: node {node.pk} “first”"):
        services.node_create(actor=system, url="http://[::ffff:127.0.0.1]:8100", models=["m"])
    again, created = services.node_upsert(actor=system, url="http://127.1:8100", models=["m"])
    assert (again.pk, created, Node.objects.count()) == (node.pk, False, 1)


def test_values_no_database_can_hold_are_refused_on_every_entity(system) -> None:
    with pytest.raises(ValidationError, match="NUL"):
        services.node_create(actor=system, url="http://127.0.0.1:8100", metadata={"k": "a\x00"})
    with pytest.raises(ValidationError, match="models"):
        services.node_create(actor=system, url="http://127.0.0.1:8101", models=["a\x00b"])
    with pytest.raises(ValidationError):
        services.policy_create(actor=system, model="m\n")
    with pytest.raises(ValidationError):
        services.control_plane_create(actor=system, name="cp", address="127.0.0.1:1", scope="\ud800")
    assert not Node.objects.exists()
