"""The registry sync's rules, with a fake NanoCtrl listing and the real Redis lock."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from django.db import connection as db
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from nodes import services
from nodes.choices import ChangeVia, NodeSource, NodeState
from nodes.listener import RegistryListener
from nodes.live import connection
from nodes.models import ChangeRecord, ControlPlane, Node
from nodes.registry import RegistryEntity, RegistryError, parse_entity, parse_event
from nodes.services.registry_sync import _sync_lock
from tests.support.ports import closed_port

pytestmark = pytest.mark.django_db


def entity(port: int, *, role: str = "hybrid", served: str = "qwen", kind: str = "nanodeploy", **meta) -> dict:
    return {
        "entity_id": f"{kind}-{served}-127.0.0.1:{port}",
        "entity_type": "service",
        "kind": kind,
        "endpoint": {"host": "127.0.0.1", "port": port, "protocol": "http"},
        "metadata": {"served_model_name": served, "model_path": f"/models/{served}-8B", "role": role, **meta},
    }


class FakeRegistry:
    """Stands in for NanoCtrlClient: lists what ``entities`` holds, or fails with ``error``. An
    ``event`` runs once, after the first listing was read and before the sync gets it (the listener
    applying a registry event while the listing is on its way)."""

    def __init__(self) -> None:
        self.entities: list[dict] = []
        self.error: str | None = None
        self.calls: list[tuple[str, str]] = []
        self.event: Callable[[], object] | None = None

    def list_entities(self, *, kind: str, scope: str):
        self.calls.append((kind, scope))
        if self.error:
            raise RegistryError(self.error)
        listed = [parse_entity(e) for e in self.entities if e["kind"] == kind], []
        event, self.event = self.event, None
        if event is not None:
            event()
        return listed


@pytest.fixture
def control_plane(system, redis_url) -> ControlPlane:
    """A control plane whose NanoCtrl address refuses connections (the tests hand the sync a fake)."""
    return services.control_plane_create(actor=system, name="local", address=f"127.0.0.1:{closed_port()}", scope="s1")


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry()


def sync(control_plane: ControlPlane, registry: FakeRegistry) -> services.SyncResult:
    return services.registry_sync(control_plane_id=control_plane.pk, client=registry)


def test_it_creates_registry_nodes_with_role_and_aliases(control_plane, registry) -> None:
    registry.entities = [entity(9001, role="prefill"), entity(9002, kind="dlengine", role="decode")]
    result = sync(control_plane, registry)
    assert result.ok and (result.listed, result.created) == (2, 2)
    assert registry.calls == [("nanodeploy", "s1"), ("dlengine", "s1")]
    node = Node.objects.get(url="http://127.0.0.1:9001")
    assert (node.role, node.source, node.control_plane, node.kind, node.scope) == (
        "prefill",
        NodeSource.REGISTRY,
        control_plane,
        "nanodeploy",
        "s1",
    )
    assert set(node.aliases.values_list("name", flat=True)) == {"qwen", "/models/qwen-8B", "qwen-8B"}
    assert node.last_seen_at is not None
    control_plane.refresh_from_db()
    assert control_plane.sync_state == "ok"
    assert control_plane.last_sync_counts["created"] == 2
    assert ChangeRecord.objects.filter(via=ChangeVia.SYNC, action="create", object_type="node").count() == 2


def test_a_second_sync_with_nothing_new_changes_nothing(control_plane, registry) -> None:
    registry.entities = [entity(9001)]
    sync(control_plane, registry)
    version = services.config_version_current()
    records = ChangeRecord.objects.count()
    result = sync(control_plane, registry)
    assert (result.unchanged, result.created, result.updated) == (1, 0, 0)
    assert services.config_version_current() == version
    assert ChangeRecord.objects.count() == records


def test_it_applies_role_and_alias_changes_from_the_registry(control_plane, registry) -> None:
    registry.entities = [entity(9001, role="prefill")]
    sync(control_plane, registry)
    registry.entities = [{**entity(9001, role="decode"), "metadata": {"served_model_name": "qwen", "role": "decode"}}]
    result = sync(control_plane, registry)
    assert result.updated == 1
    node = Node.objects.get()
    assert node.role == "decode"
    assert set(node.aliases.values_list("name", flat=True)) == {"qwen"}


def test_it_marks_vanished_nodes_gone_and_revives_them(control_plane, registry) -> None:
    registry.entities = [entity(9001), entity(9002)]
    sync(control_plane, registry)
    registry.entities = [entity(9001)]
    result = sync(control_plane, registry)
    assert result.gone == 1
    assert Node.objects.get(url="http://127.0.0.1:9002").state == NodeState.GONE
    assert Node.objects.count() == 2  # kept, not deleted
    registry.entities = [entity(9001), entity(9002)]
    result = sync(control_plane, registry)
    assert result.revived == 1
    assert Node.objects.get(url="http://127.0.0.1:9002").state == NodeState.ACTIVE


def test_a_listing_older_than_an_event_does_not_mark_the_evented_node_gone(control_plane, registry) -> None:
    registry.entities = [entity(9001), entity(9002)]
    sync(control_plane, registry)
    registry.entities = [entity(9001)]  # 9002 really went away; 9003 registered after the listing was read
    registry.event = lambda: services.registry_apply_entity(
        control_plane=control_plane, entity=parse_entity(entity(9003)), now=timezone.now()
    )
    result = sync(control_plane, registry)
    assert result.gone == 1
    states = dict(Node.objects.values_list("url", "state"))
    assert states == {
        "http://127.0.0.1:9001": NodeState.ACTIVE,
        "http://127.0.0.1:9002": NodeState.GONE,
        "http://127.0.0.1:9003": NodeState.ACTIVE,
    }
    # The next listing that still lacks it is newer than its event: then it is gone.
    assert sync(control_plane, registry).gone == 1
    assert Node.objects.get(url="http://127.0.0.1:9003").state == NodeState.GONE


def test_a_listing_older_than_a_remove_event_does_not_revive_the_node(control_plane, registry) -> None:
    registry.entities = [entity(9001), entity(9002)]
    sync(control_plane, registry)
    # The listing is read just before 9002 leaves.
    registry.event = lambda: services.registry_mark_gone(
        control_plane=control_plane, entity_ids=[entity(9002)["entity_id"]]
    )
    result = sync(control_plane, registry)
    assert result.revived == 0
    assert Node.objects.get(url="http://127.0.0.1:9002").state == NodeState.GONE
    # A listing asked for after the event that lists it again: the engine is back.
    assert sync(control_plane, registry).revived == 1
    assert Node.objects.get(url="http://127.0.0.1:9002").state == NodeState.ACTIVE


def test_an_unreachable_registry_changes_no_node(control_plane, registry) -> None:
    registry.entities = [entity(9001), entity(9002)]
    sync(control_plane, registry)
    before = list(Node.objects.order_by("pk").values("url", "state", "role"))
    registry.error = "NanoCtrl at http://127.0.0.1:4479 is unreachable: ConnectError"
    result = sync(control_plane, registry)
    assert not result.ok and not result.skipped
    assert list(Node.objects.order_by("pk").values("url", "state", "role")) == before
    control_plane.refresh_from_db()
    assert control_plane.sync_state == "failed"
    assert "unreachable" in control_plane.last_sync_error
    registry.error = None
    assert sync(control_plane, registry).ok
    control_plane.refresh_from_db()
    assert (control_plane.sync_state, control_plane.last_sync_error) == ("ok", "")


class ObservingRegistry(FakeRegistry):
    """Records the control plane's state as the admin would show it while the listing runs."""

    def __init__(self, control_plane_pk: int) -> None:
        super().__init__()
        self.pk, self.seen = control_plane_pk, []

    def list_entities(self, *, kind: str, scope: str):
        self.seen.append(ControlPlane.objects.get(pk=self.pk).sync_state)
        return super().list_entities(kind=kind, scope=scope)


def test_during_an_outage_a_failed_control_plane_shows_failed_while_the_next_attempt_runs(control_plane) -> None:
    registry = ObservingRegistry(control_plane.pk)
    shown = []
    for error in (None, "NanoCtrl at http://127.0.0.1:4479 is unreachable: ConnectError", "unreachable", None):
        registry.error, registry.seen = error, []
        sync(control_plane, registry)
        shown.append(registry.seen[0])
    # Retries after a failure keep showing "failed" (with its error) until one succeeds.
    assert shown == ["syncing", "syncing", "failed", "failed"]
    control_plane.refresh_from_db()
    assert control_plane.sync_state == "ok"


def test_manual_nodes_are_never_touched(control_plane, registry, system) -> None:
    manual = services.node_create(actor=system, url="http://127.0.0.1:9001", models=["mine"], role="decode")
    registry.entities = [entity(9001, role="prefill")]
    result = sync(control_plane, registry)
    assert result.conflicts == 1
    manual.refresh_from_db()
    assert (manual.role, manual.source, manual.served_models) == ("decode", NodeSource.MANUAL, ["mine"])
    registry.entities = []
    sync(control_plane, registry)
    manual.refresh_from_db()
    assert manual.state == NodeState.ACTIVE


def test_an_operators_edits_survive_later_syncs(control_plane, registry) -> None:
    registry.entities = [entity(9001, role="prefill")]
    sync(control_plane, registry)
    node = Node.objects.get()
    operator = services.Actor("alice", ChangeVia.ADMIN)
    services.node_update(node=node, actor=operator, weight=9, state=NodeState.DISABLED, role="decode")
    registry.entities = [entity(9001, role="hybrid")]
    sync(control_plane, registry)
    node.refresh_from_db()
    assert (node.weight, node.state, node.role) == (9, NodeState.DISABLED, "decode")
    registry.entities = []
    sync(control_plane, registry)
    node.refresh_from_db()
    assert node.state == NodeState.DISABLED  # an operator's disabled node is not turned into "gone"


def test_control_planes_are_isolated(control_plane, registry, system) -> None:
    other = services.control_plane_create(actor=system, name="other", address="127.0.0.1:4480", scope="s2")
    other_registry = FakeRegistry()
    other_registry.entities = [entity(9100)]
    services.registry_sync(control_plane_id=other.pk, client=other_registry)
    registry.entities = [entity(9001)]
    sync(control_plane, registry)
    assert Node.objects.get(url="http://127.0.0.1:9100").state == NodeState.ACTIVE
    assert Node.objects.get(url="http://127.0.0.1:9100").control_plane == other


def test_a_held_lock_makes_a_second_sync_skip(control_plane, registry) -> None:
    lock = _sync_lock(control_plane)
    assert lock.acquire()
    try:
        result = sync(control_plane, registry)
    finally:
        lock.release()
    assert result.skipped and "another sync" in result.reason
    assert registry.calls == []


def test_without_redis_the_sync_skips_and_says_why(control_plane, registry, settings) -> None:
    settings.ROUTERPANEL_REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    connection._client = None
    result = sync(control_plane, registry)
    assert result.skipped and "Redis is unavailable" in result.reason


def test_each_control_plane_gets_a_beat_schedule_just_under_its_interval(system, redis_url) -> None:
    cp = services.control_plane_create(actor=system, name="cp", address="127.0.0.1:4479", sync_interval=20)
    task = PeriodicTask.objects.get(task="nodes.sync_control_plane")
    assert (task.interval.every, task.interval.period, task.expire_seconds, task.enabled) == (20, "seconds", 18, True)
    services.control_plane_update(control_plane=cp, actor=system, sync_interval=5, enabled=False)
    task.refresh_from_db()
    assert (task.interval.every, task.expire_seconds, task.enabled) == (5, 4, False)
    services.control_plane_delete(control_plane=cp, actor=system)
    assert not PeriodicTask.objects.filter(task="nodes.sync_control_plane").exists()


def test_events_add_and_remove_nodes(control_plane) -> None:
    add = (
        b'{"event_type":"ADD","entity_type":"service","entity_id":"nanodeploy-qwen-127.0.0.1:9001",'
        b'"kind":"nanodeploy","payload":' + json.dumps(entity(9001, role="decode")).encode() + b"}"
    )
    assert RegistryListener.apply(control_plane, parse_event(add)) == "created"
    assert Node.objects.get().role == "decode"
    remove = b'{"entity_type":"service","entity_id":"nanodeploy-qwen-127.0.0.1:9001","event_type":"REMOVE"}'
    assert RegistryListener.apply(control_plane, parse_event(remove)) == "gone"
    assert Node.objects.get().state == NodeState.GONE


def test_events_of_kinds_not_imported_are_ignored(control_plane) -> None:
    services.control_plane_update(control_plane=control_plane, actor=services.Actor.system(), kinds=["dlengine"])
    event = parse_event(
        b'{"event_type":"ADD","entity_type":"service","entity_id":"x","kind":"nanodeploy","payload":'
        + json.dumps(entity(9001)).encode()
        + b"}"
    )
    assert RegistryListener.apply(control_plane, event) == "ignored"
    assert not Node.objects.exists()


@pytest.mark.parametrize(
    "payload",
    [
        {"entity_id": "x", "endpoint": {"port": 1}},
        {"entity_id": "x", "endpoint": {"host": "h", "port": "nope"}},
        {"entity_id": "x", "endpoint": {"host": "h", "port": 1, "protocol": "grpc"}},
        {"endpoint": {"host": "h", "port": 1}},
        "nope",
    ],
)
def test_unusable_entities_are_refused(payload) -> None:
    with pytest.raises(ValueError):
        parse_entity(payload)


def test_served_name_defaults_to_the_model_path_basename() -> None:
    e = RegistryEntity(entity_id="x", kind="dlengine", host="::1", port=8000, metadata={"model_path": "/m/Qwen3/"})
    assert (e.served_model_name, e.url, e.role) == ("Qwen3", "http://[::1]:8000", "hybrid")


def test_the_rest_api_sync_action_reports_failure_with_502(operator_api, control_plane) -> None:
    # The control plane points at a port where no NanoCtrl listens.
    response = operator_api.post(f"/api/control-planes/{control_plane.pk}/sync/")
    assert response.status_code == 502
    assert response.json()["ok"] is False
    assert "unreachable" in response.json()["reason"]


def test_the_admin_sync_now_action_reports_the_result(client, admin_user, control_plane) -> None:
    client.force_login(admin_user)
    response = client.post(
        "/admin/nodes/controlplane/", {"action": "sync_now", "_selected_action": [control_plane.pk]}, follow=True
    )
    expected = f"local: failed: nanoctrl at http://{control_plane.address} is unreachable"
    assert expected in response.content.decode().lower()


# -- who may join: approval mode and allowed networks ------------------------------------------


def test_with_manual_approval_new_registry_nodes_wait_as_pending_until_approved(control_plane, registry) -> None:
    services.control_plane_update(control_plane=control_plane, actor=services.Actor.system(), approval_mode="manual")
    registry.entities = [entity(9001, role="prefill")]
    result = sync(control_plane, registry)
    assert result.created == 1
    node = Node.objects.get()
    assert (node.state, node.role) == (NodeState.PENDING, "prefill")
    # Later syncs keep it pending; vanishing from the registry does not turn it into "gone" (which
    # would come back "active" without an approval).
    assert sync(control_plane, registry).unchanged == 1
    registry.entities = []
    assert sync(control_plane, registry).gone == 0
    registry.entities = [entity(9001, role="prefill")]
    sync(control_plane, registry)
    node.refresh_from_db()
    assert node.state == NodeState.PENDING
    services.node_approve(node=node, actor=services.Actor("alice", ChangeVia.ADMIN))
    assert sync(control_plane, registry).unchanged == 1
    node.refresh_from_db()
    assert node.state == NodeState.ACTIVE


def test_with_automatic_approval_new_registry_nodes_are_active_at_once(control_plane, registry) -> None:
    registry.entities = [entity(9001)]
    sync(control_plane, registry)
    assert Node.objects.get().state == NodeState.ACTIVE


def test_registry_entities_outside_the_allowed_networks_are_refused_and_not_stored(control_plane, registry) -> None:
    services.control_plane_update(
        control_plane=control_plane, actor=services.Actor.system(), allowed_networks=["10.0.0.0/8"]
    )
    inside = {**entity(9002), "endpoint": {"host": "10.1.2.3", "port": 9002, "protocol": "http"}}
    registry.entities = [entity(9001), inside]
    result = sync(control_plane, registry)
    assert (result.ok, result.created, result.refused) == (True, 1, 1)
    assert "127.0.0.1:9001 is outside the allowed networks" in " ".join(result.problems)
    assert list(Node.objects.values_list("url", flat=True)) == ["http://10.1.2.3:9002"]
    control_plane.refresh_from_db()
    assert control_plane.last_sync_counts["refused"] == 1


def test_narrowing_the_allowed_networks_takes_nodes_outside_out_of_rotation(control_plane, registry) -> None:
    registry.entities = [entity(9001)]
    sync(control_plane, registry)
    services.control_plane_update(
        control_plane=control_plane, actor=services.Actor.system(), allowed_networks=["10.0.0.0/8"]
    )
    result = sync(control_plane, registry)
    assert (result.refused, result.gone) == (1, 1)
    assert Node.objects.get().state == NodeState.GONE


def test_a_refused_event_is_not_applied(control_plane) -> None:
    services.control_plane_update(
        control_plane=control_plane, actor=services.Actor.system(), allowed_networks=["192.168.0.0/16"]
    )
    add = parse_event(
        b'{"event_type":"ADD","entity_type":"service","entity_id":"nanodeploy-qwen-127.0.0.1:9001",'
        b'"kind":"nanodeploy","payload":' + json.dumps(entity(9001)).encode() + b"}"
    )
    assert RegistryListener.apply(control_plane, add) == "refused"
    assert not Node.objects.exists()


def test_an_entity_advertising_a_bind_address_is_invalid(control_plane, registry) -> None:
    registry.entities = [{**entity(9001), "endpoint": {"host": "0.0.0.0", "port": 9001, "protocol": "http"}}]
    result = sync(control_plane, registry)
    assert (result.ok, result.invalid) == (True, 1)
    assert not Node.objects.exists()


def test_a_direct_registration_control_plane_has_no_sync_and_no_schedule(system, redis_url) -> None:
    plane = services.control_plane_create(actor=system, name="direct", kind="direct")
    assert not PeriodicTask.objects.filter(task="nodes.sync_control_plane").exists()
    result = services.registry_sync(control_plane_id=plane.pk, client=FakeRegistry())
    assert result.skipped and "direct" in result.reason


def test_an_entity_that_fails_the_shared_validation_is_skipped_as_invalid(control_plane, registry) -> None:
    registry.entities = [
        entity(9001),
        entity(9002, served="bad\x00name"),
        entity(9003, note="a\x00b"),  # metadata no database holds
        {**entity(9004), "endpoint": {"host": "my host", "port": 9004, "protocol": "http"}},
    ]
    result = sync(control_plane, registry)
    assert result.ok and (result.created, result.invalid) == (1, 3)
    assert list(Node.objects.values_list("url", flat=True)) == ["http://127.0.0.1:9001"]


# -- fleet scale: one diff, bulk writes --------------------------------------------------------


def fleet(size: int, *, role: str = "hybrid") -> list[dict]:
    return [{**entity(10000 + i, role=role), "entity_id": f"nanodeploy-{i}"} for i in range(size)]


def queries_of_sync(control_plane: ControlPlane, registry: FakeRegistry) -> int:
    with CaptureQueriesContext(db) as queries:
        assert sync(control_plane, registry).ok
    return len(queries)


def test_a_syncs_queries_do_not_grow_with_the_number_of_entities(control_plane, registry, system) -> None:
    other = services.control_plane_create(actor=system, name="other", address="127.0.0.1:4480", scope="s2")
    other_registry = FakeRegistry()
    small = fleet(10)
    large = [{**e, "endpoint": {**e["endpoint"], "port": e["endpoint"]["port"] + 1000}} for e in fleet(500)]
    registry.entities = small
    created_small = queries_of_sync(control_plane, registry)
    unchanged_small = queries_of_sync(control_plane, registry)
    registry.entities = [{**e, "metadata": {**e["metadata"], "role": "decode"}} for e in small]
    changed_small = queries_of_sync(control_plane, registry)
    other_registry.entities, registry = large, other_registry
    created_large = queries_of_sync(other, registry)
    unchanged_large = queries_of_sync(other, registry)
    registry.entities = [{**e, "metadata": {**e["metadata"], "role": "decode"}} for e in large]
    changed_large = queries_of_sync(other, registry)
    assert unchanged_large == unchanged_small
    # Bulk writes come in the database's batches (SQLite takes 999 parameters a query): far from a
    # query per entity, and none per entity on a database without that limit.
    assert created_large - created_small < 500 / 10
    assert changed_large - changed_small < 500 / 10
    assert Node.objects.filter(control_plane=other, role="decode").count() == 500
    assert Node.objects.filter(control_plane=control_plane, role="decode").count() == 10


def test_a_sync_bumps_the_configuration_version_once_and_audits_every_change(control_plane, registry) -> None:
    version = services.config_version_current()
    registry.entities = fleet(20)
    assert sync(control_plane, registry).created == 20
    assert services.config_version_current() == version + 1
    # Each node and each of its three aliases has its creation record, as when created one by one.
    assert ChangeRecord.objects.filter(via=ChangeVia.SYNC, action="create", object_type="node").count() == 20
    assert ChangeRecord.objects.filter(via=ChangeVia.SYNC, action="create", object_type="modelalias").count() == 60
    registry.entities = fleet(20, role="prefill")[:15]
    result = sync(control_plane, registry)
    assert (result.updated, result.gone) == (15, 5)
    assert services.config_version_current() == version + 2
    updates = ChangeRecord.objects.filter(via=ChangeVia.SYNC, action="update", object_type="node")
    assert sorted(r.changes.get("role", [None, None])[1] or r.changes["state"][1] for r in updates) == sorted(
        ["prefill"] * 15 + ["gone"] * 5
    )


def test_a_registry_node_listed_by_another_control_plane_is_taken_over(control_plane, registry, system) -> None:
    other = services.control_plane_create(actor=system, name="other", address="127.0.0.1:4480", scope="s2")
    other_registry = FakeRegistry()
    other_registry.entities = [entity(9001)]
    services.registry_sync(control_plane_id=other.pk, client=other_registry)
    registry.entities = [entity(9001, role="decode")]
    assert sync(control_plane, registry).updated == 1
    node = Node.objects.get()
    assert (node.control_plane, node.role, node.scope) == (control_plane, "decode", "s1")


def test_a_served_name_an_operators_alias_of_the_node_holds_makes_the_entity_invalid(
    control_plane, registry, system
) -> None:
    registry.entities = [entity(9001)]
    sync(control_plane, registry)
    node = Node.objects.get()
    services.alias_create(actor=system, node=node, name="llama", served_name="qwen")
    registry.entities = [{**entity(9001, served="llama", role="decode"), "entity_id": entity(9001)["entity_id"]}]
    result = sync(control_plane, registry)
    assert (result.invalid, result.gone) == (1, 0)
    node.refresh_from_db()
    assert (node.role, node.state, node.served_models) == ("hybrid", NodeState.ACTIVE, ["qwen"])
