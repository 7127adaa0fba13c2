"""What keeps a sync of thousands of new entities cheap (bench/registry_sync.py measures it): rows
inserted without Django's per-value SQL compiler, and each value the entities share validated once."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, models

from nodes import services
from nodes.choices import ChangeAction, NodeSource, NodeState
from nodes.models import ChangeRecord, ControlPlane, ModelAlias, Node
from nodes.services.bulk import bulk_insert

from .test_registry_sync import FakeRegistry, entity, sync

pytestmark = pytest.mark.django_db


@pytest.fixture
def control_plane(system, redis_url) -> ControlPlane:
    return services.control_plane_create(actor=system, name="bulk", address="127.0.0.1:1", scope="s1")


SEEN = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.UTC)


def nodes(control_plane: ControlPlane, count: int, *, first_port: int) -> list[Node]:
    return [
        Node(
            url=f"http://10.1.{(first_port + i) // 256 % 256}.{(first_port + i) % 256}:{first_port}",
            source=NodeSource.REGISTRY,
            state=NodeState.PENDING if i % 2 else NodeState.ACTIVE,
            role="prefill" if i % 3 == 0 else "hybrid",
            control_plane=control_plane,
            entity_id=f"e-{first_port}-{i}",
            kind="nanodeploy",
            scope="s1",
            weight=1 + i % 3,
            health_interval=2.5 if i % 2 else None,
            last_seen_at=SEEN,
            metadata={"registry": {"model_path": "/models/ünïcode-8B", "n": i, "nested": [1, {"a": None}]}},
            endpoints=["chat", "embeddings"] if i % 2 else [],
            operator_fields=["weight"] if i % 5 == 0 else [],
        )
        for i in range(count)
    ]


def stored(model: type[models.Model], pks: list[int], leave_out: set[str]) -> list[dict[str, Any]]:
    rows = {row["id"]: row for row in model.objects.filter(pk__in=pks).values()}
    return [{k: v for k, v in rows[pk].items() if k not in leave_out} for pk in pks]


def test_bulk_insert_stores_the_rows_bulk_create_stores_and_sets_every_primary_key(control_plane, system) -> None:
    # More nodes than one SQLite statement holds (999 parameters: 33 nodes), so the keys read back
    # from several statements must each land on their own object.
    by_django = Node.objects.bulk_create(nodes(control_plane, 80, first_port=1000))
    ours = bulk_insert(Node, nodes(control_plane, 80, first_port=2000))
    assert all(node.pk is not None and not node._state.adding for node in ours)
    assert [Node.objects.get(pk=node.pk).entity_id for node in ours] == [node.entity_id for node in ours]
    differ = {"id", "url", "entity_id", "created_at", "updated_at"}
    assert stored(Node, [n.pk for n in ours], differ) == stored(Node, [n.pk for n in by_django], differ)
    assert all(n.created_at is not None and n.updated_at is not None for n in Node.objects.filter(pk__in=[ours[0].pk]))

    aliases = [ModelAlias(node_id=node.pk, name="ünï", served_name="qwen", origin="served") for node in ours]
    bulk_insert(ModelAlias, aliases)
    assert {a.node_id for a in ModelAlias.objects.filter(pk__in=[a.pk for a in aliases])} == {n.pk for n in ours}

    def record(node: Node) -> ChangeRecord:
        return ChangeRecord(
            actor=None,
            actor_label="registry-sync:bulk",
            via="sync",
            action=ChangeAction.CREATE,
            object_type="node",
            object_id=str(node.pk),
            object_repr=str(node),
            changes={"url": [None, node.url], "metadata": [None, node.metadata]},
        )

    records = [record(node) for node in ours]
    copies = ChangeRecord.objects.bulk_create([record(ours[0])])
    bulk_insert(ChangeRecord, records)
    differ = {"id", "created_at"}
    assert stored(ChangeRecord, [records[0].pk], differ) == stored(ChangeRecord, [copies[0].pk], differ)
    assert ChangeRecord.objects.get(pk=records[-1].pk).changes["metadata"][1] == ours[-1].metadata


def cpu(insert: Callable[[list[ChangeRecord]], object], batch: list[ChangeRecord]) -> float:
    started = time.process_time()
    insert(batch)
    return time.process_time() - started


@pytest.mark.alone  # a ratio of CPU times: measured after the parallel run, on a machine to itself
@pytest.mark.skipif(connection.vendor != "sqlite", reason="on PostgreSQL bulk_insert is bulk_create (UNNEST)")
def test_bulk_insert_costs_a_fraction_of_bulk_create(control_plane) -> None:
    # The audit records of a sync of 5,000 new nodes are 20,000 rows: Django's compiler prepared each
    # of their values through several calls; the database's own work is the smaller part.
    def records(tag: str) -> list[ChangeRecord]:
        return [
            ChangeRecord(
                actor_label="registry-sync:bulk",
                via="sync",
                action=ChangeAction.CREATE,
                object_type="modelalias",
                object_id=f"{tag}{i}",
                object_repr="qwen",
                changes={"name": [None, "qwen"], "served_name": [None, "qwen"], "origin": [None, "served"]},
            )
            for i in range(1500)
        ]

    django_cpu = min(cpu(ChangeRecord.objects.bulk_create, records(f"d{i}")) for i in range(3))
    our_cpu = min(cpu(lambda batch: bulk_insert(ChangeRecord, batch), records(f"o{i}")) for i in range(3))
    assert our_cpu < 0.8 * django_cpu, (our_cpu, django_cpu)  # about 0.55 measured, without DEBUG


def test_a_sync_validates_each_value_its_new_entities_share_once(control_plane, monkeypatch) -> None:
    # 300 engines of one model: each node's own values (URL, entity id, metadata) are checked, the
    # control plane's, the role's, the kind's and the aliases' once, not 300 times each.
    cleaned: list[str] = []
    original = models.Field.clean

    def counting(self: models.Field[Any, Any], value: Any, instance: models.Model | None) -> Any:
        cleaned.append(self.name)
        return original(self, value, instance)

    monkeypatch.setattr(models.Field, "clean", counting)
    registry = FakeRegistry()
    registry.entities = [entity(7000 + i) for i in range(300)]
    assert sync(control_plane, registry).created == 300
    assert Node.objects.filter(control_plane=control_plane).count() == 300
    assert len(cleaned) < 300 * 4, len(cleaned)


def test_a_value_that_fails_validation_is_refused_after_valid_ones(control_plane) -> None:
    registry = FakeRegistry()
    too_long = {**entity(7101), "entity_id": "x" * 300}
    registry.entities = [entity(7100), too_long, entity(7102), {**entity(7103), "entity_id": "bad\x00id"}]
    result = sync(control_plane, registry)
    assert (result.created, result.invalid) == (2, 2)
    assert sorted(Node.objects.values_list("url", flat=True)) == ["http://127.0.0.1:7100", "http://127.0.0.1:7102"]


def test_a_shared_value_that_cleaning_converts_is_converted_on_every_node(control_plane) -> None:
    # Remembering a value as validated must not skip its conversion: a weight that arrives as "2"
    # is stored as the number 2 on every node that has it, not only on the first.
    from nodes.services.registry_validation import Validated

    validated = Validated()
    nodes = [Node(url=f"http://127.0.0.1:{7200 + i}", control_plane=control_plane, weight="2") for i in range(3)]
    for node in nodes:
        validated.node(node)
    assert [node.weight for node in nodes] == [2, 2, 2]
