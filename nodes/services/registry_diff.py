"""The registry sync's diff: a listing of entities against the rows in memory, written in bulk.

A sync of a fleet of thousands of engines must stay well within its interval, so it reads the
control plane's nodes and their aliases once (locked until it commits), decides every entity in
memory (validating each distinct value once, ``registry_validation``), and writes what changed with
``bulk_insert`` (``nodes/services/bulk.py``) / ``bulk_update``, its audit records in bulk and at
most one configuration version bump: the number of queries does not grow with the fleet (bulk
writes come in the database's batches). A registry event applies one entity the same way,
reading only that entity's rows. The rules (docs/architecture.md, "Who may join"): an operator's
fields survive, a manual node's URL is a conflict, a new node starts as ``admission.initial_state``
says, a ``gone`` node that comes back is ``active``, what fails the shared validation is ``invalid``
and not stored.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from .. import admission
from ..choices import AliasOrigin, ChangeAction, ChangeVia, NodeSource, NodeState
from ..models import ChangeRecord, ControlPlane, ModelAlias, Node, aliases_for_model
from ..networks import validate_node_url
from ..registry import RegistryEntity
from ..validators import clean_model_names
from .audit import Actor, change_record, config_version_bump, diff_fields, field_values
from .bulk import bulk_insert
from .registry_validation import Validated

logger = logging.getLogger(__name__)

ID_BATCH = 500  # values per ``__in`` lookup: well under SQLite's 999 parameters

# What the sync of one entity did; ``registry_sync`` counts them.
Outcome = str
ListedAt = datetime.datetime | None  # when a sync asked for the listing it applies; None: an event


def sync_actor(control_plane: ControlPlane) -> Actor:
    return Actor(label=f"registry-sync:{control_plane.name}"[:200], via=ChangeVia.SYNC)


@dataclass
class _AliasPlan:
    create: list[ModelAlias] = field(default_factory=list)
    update: list[tuple[ModelAlias, str, str]] = field(default_factory=list)
    delete: list[ModelAlias] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.create or self.update or self.delete)


@dataclass
class _Rows:
    """The rows a diff works on, as read under their lock, and the writes it decided."""

    control_plane: ControlPlane
    actor: Actor
    nodes: dict[int, Node] = field(default_factory=dict)
    by_entity: dict[str, Node] = field(default_factory=dict)  # this control plane's nodes
    by_url: dict[str, Node] = field(default_factory=dict)
    aliases: dict[int, list[ModelAlias]] = field(default_factory=dict)  # synced (not operator) aliases
    operator_aliases: dict[int, set[str]] = field(default_factory=dict)
    new_nodes: list[tuple[Node, list[ModelAlias]]] = field(default_factory=list)
    changed_nodes: dict[int, set[str]] = field(default_factory=dict)  # pk -> changed attribute names
    created_aliases: list[ModelAlias] = field(default_factory=list)
    changed_aliases: list[ModelAlias] = field(default_factory=list)
    deleted_aliases: list[ModelAlias] = field(default_factory=list)
    records: list[ChangeRecord] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    validated: Validated = field(default_factory=Validated)
    listed_at: ListedAt = None  # a listing's: when it was asked for (``registry_diff_apply``)

    def add(self, node: Node) -> None:
        self.nodes[node.pk] = node
        self.by_url[node.url] = node
        if node.entity_id and node.control_plane_id == self.control_plane.pk:
            self.by_entity[node.entity_id] = node

    def load_aliases(self, node_ids: Iterable[int], *, of_control_plane: bool = False) -> None:
        ids = [pk for pk in node_ids if pk not in self.aliases]
        if not ids:
            return
        for pk in ids:
            self.aliases[pk], self.operator_aliases[pk] = [], set()
        if of_control_plane:  # one query for the whole control plane
            queries = [ModelAlias.objects.filter(node__control_plane=self.control_plane)]
        else:
            queries = [
                ModelAlias.objects.filter(node_id__in=ids[i : i + ID_BATCH]) for i in range(0, len(ids), ID_BATCH)
            ]
        for query in queries:
            for alias in query:
                if alias.node_id not in self.aliases:
                    continue
                if alias.origin == AliasOrigin.OPERATOR:
                    self.operator_aliases[alias.node_id].add(alias.name)
                else:
                    self.aliases[alias.node_id].append(alias)

    def change(self, node: Node, changes: dict[str, Any], *, note: str = "") -> None:
        """Apply ``changes`` (attribute names) to ``node`` in memory and record them for the audit."""
        before = field_values(node)
        for name, value in changes.items():
            setattr(node, name, value)
        diff = diff_fields(before, field_values(node))
        if diff:
            self.records.append(change_record(self.actor, ChangeAction.UPDATE, node, diff, note))
            self.changed_nodes.setdefault(node.pk, set()).update(changes)


def _alias_plan(rows: _Rows, node_id: int | None, *, served: str, model_path: str) -> _AliasPlan:
    """The changes that make the node's synced aliases exactly what the entity serves (as
    ``node_set_models`` does); operator-added aliases are kept. ``ValidationError`` if unusable."""
    try:
        served_names = clean_model_names([served] if served else [])
    except ValidationError as exc:
        raise ValidationError({"models": exc.messages}) from None
    wanted: dict[str, tuple[str, str]] = {}
    for name in served_names:
        for alias_name, origin in aliases_for_model(name, model_path):
            wanted.setdefault(alias_name, (name, origin))
    current = {a.name: a for a in rows.aliases.get(node_id, [])} if node_id is not None else {}
    taken = rows.operator_aliases.get(node_id, set()) if node_id is not None else set()
    plan = _AliasPlan(delete=[alias for name, alias in current.items() if name not in wanted])
    for name, (served_name, origin) in wanted.items():
        kept = current.get(name)
        if kept is not None and (kept.served_name, kept.origin) == (served_name, origin):
            continue
        if kept is None and name in taken:
            raise ValidationError("This node already has an alias with this name.", code="unique")
        rows.validated.alias(name=name, served_name=served_name, origin=origin)
        if kept is None:
            plan.create.append(ModelAlias(node_id=node_id, name=name, served_name=served_name, origin=origin))
        else:
            plan.update.append((kept, served_name, origin))
    return plan


def _apply_aliases(rows: _Rows, plan: _AliasPlan) -> None:
    for alias in plan.delete:
        rows.records.append(change_record(rows.actor, ChangeAction.DELETE, alias, {}))
        rows.deleted_aliases.append(alias)
    for alias, served_name, origin in plan.update:
        before = field_values(alias)
        alias.served_name, alias.origin = served_name, origin
        rows.records.append(
            change_record(rows.actor, ChangeAction.UPDATE, alias, diff_fields(before, field_values(alias)))
        )
        rows.changed_aliases.append(alias)
    rows.created_aliases.extend(plan.create)


def _decide(rows: _Rows, entity: RegistryEntity, *, url: str, now: datetime.datetime) -> Outcome:
    control_plane = rows.control_plane
    node = rows.by_entity.get(entity.entity_id)
    if node is None:
        node = rows.by_url.get(url)
        if node is not None and (node.source != NodeSource.REGISTRY or node.pk is None):
            # Never touch an operator's manual or static node; nor claim, for a second entity, a
            # node this listing has just created (two entities listing one URL).
            return "conflict"
    imported: dict[str, Any] = {
        "url": url,
        "role": entity.role,
        "engine_type": control_plane.engine_type,
        "kind": entity.kind,
        "scope": control_plane.scope,
    }
    served = entity.served_model_name
    if node is None:
        node = Node(
            source=NodeSource.REGISTRY,
            state=admission.initial_state(control_plane),
            control_plane_id=control_plane.pk,
            entity_id=entity.entity_id,
            last_seen_at=now,
            metadata={"registry": entity.metadata},
            **imported,
        )
        rows.validated.node(node)
        plan = _alias_plan(rows, None, served=served, model_path=entity.model_path)
        rows.new_nodes.append((node, plan.create))
        rows.by_url[url] = node
        rows.by_entity[entity.entity_id] = node
        return "created"

    kept = set(node.operator_fields or [])
    changes: dict[str, Any] = {k: v for k, v in imported.items() if k not in kept and getattr(node, k) != v}
    if node.control_plane_id != control_plane.pk or node.entity_id != entity.entity_id:
        changes.update(control_plane_id=control_plane.pk, entity_id=entity.entity_id)
    if node.metadata.get("registry") != entity.metadata and "metadata" not in kept:
        changes["metadata"] = {**node.metadata, "registry": entity.metadata}
    # Not by a listing older than the node's last change (a REMOVE event made it gone meanwhile).
    revived = node.state == NodeState.GONE and (rows.listed_at is None or node.updated_at <= rows.listed_at)
    if revived:
        changes["state"] = NodeState.ACTIVE
    if "url" in changes and rows.by_url.get(url) not in (None, node):
        clash = rows.by_url[url]
        raise ValidationError({"url": f"A node with URL {url} already exists: node {clash.pk}."}, code="unique")
    if changes:
        old = {name: getattr(node, name) for name in changes}
        for name, value in changes.items():
            setattr(node, name, value)
        try:
            rows.validated.node(node)
        finally:
            for name, value in old.items():
                setattr(node, name, value)
    plan = _AliasPlan()
    if "aliases" not in kept:
        plan = _alias_plan(rows, node.pk, served=served, model_path=entity.model_path)
    # Decided: from here on nothing fails, so the node is changed in memory and its writes queued.
    if rows.by_url.get(node.url) is node:
        del rows.by_url[node.url]
    if rows.by_entity.get(node.entity_id) is node:
        del rows.by_entity[node.entity_id]
    if changes:
        rows.change(node, changes)
    rows.by_url[node.url] = node
    rows.by_entity[node.entity_id] = node
    _apply_aliases(rows, plan)
    rows.seen.add(node.pk)
    if revived:
        return "revived"
    return "updated" if changes or plan else "unchanged"


def _go(rows: _Rows, should_go: Callable[[Node], bool]) -> int:
    """Mark the control plane's active or draining registry nodes for which ``should_go`` holds as
    ``gone`` (kept, not deleted; an operator's disabled node stays disabled, a pending one stays
    pending: it was never approved, and coming back ``gone`` → ``active`` would skip the approval)."""
    count = 0
    for node in rows.nodes.values():
        if (
            node.control_plane_id == rows.control_plane.pk
            and node.source == NodeSource.REGISTRY
            and node.state in (NodeState.ACTIVE, NodeState.DRAINING)
            and should_go(node)
        ):
            rows.change(node, {"state": NodeState.GONE}, note="missing from the registry")
            count += 1
    return count


def _write(rows: _Rows, *, now: datetime.datetime) -> None:
    """Store what the diff decided: bulk writes, the audit records in bulk, one version bump."""
    if rows.deleted_aliases:
        pks = [alias.pk for alias in rows.deleted_aliases]
        for start in range(0, len(pks), ID_BATCH):
            ModelAlias.objects.filter(pk__in=pks[start : start + ID_BATCH]).delete()
    if rows.changed_nodes:
        changed = [rows.nodes[pk] for pk in rows.changed_nodes]
        for node in changed:
            node.updated_at = now
        names = set().union(*rows.changed_nodes.values()) | {"updated_at"}
        Node.objects.bulk_update(changed, sorted(names))
    if rows.changed_aliases:
        ModelAlias.objects.bulk_update(rows.changed_aliases, ["served_name", "origin"])
    if rows.new_nodes:
        bulk_insert(Node, [node for node, _ in rows.new_nodes])
        for node, aliases in rows.new_nodes:
            rows.records.append(
                change_record(rows.actor, ChangeAction.CREATE, node, diff_fields({}, field_values(node)))
            )
            for alias in aliases:
                alias.node_id = node.pk
            rows.created_aliases.extend(aliases)
    if rows.created_aliases:
        bulk_insert(ModelAlias, rows.created_aliases)
        for alias in rows.created_aliases:
            rows.records.append(
                change_record(rows.actor, ChangeAction.CREATE, alias, diff_fields({}, field_values(alias)))
            )
    if rows.records:
        bulk_insert(ChangeRecord, rows.records)
        config_version_bump()


def _checked(
    control_plane: ControlPlane, entities: Iterable[RegistryEntity], outcomes: dict[str, Outcome]
) -> list[tuple[RegistryEntity, str]]:
    """The entities whose URL is usable and allowed, with that URL; the others' outcomes set."""
    checked: list[tuple[RegistryEntity, str]] = []
    for entity in entities:
        try:
            url = validate_node_url(entity.url)
        except ValidationError:
            outcomes[entity.entity_id] = "invalid"
            continue
        try:
            admission.check_allowed(control_plane, url=url)
        except admission.AdmissionRefused as exc:
            logger.warning("registry entity %s of %s refused: %s", entity.entity_id, control_plane, exc)
            outcomes[entity.entity_id] = "refused"
            continue
        checked.append((entity, url))
    return checked


def registry_diff_apply(
    *, control_plane: ControlPlane, entities: Sequence[RegistryEntity], now: datetime.datetime, listed_at: ListedAt
) -> tuple[dict[str, Outcome], int]:
    """Apply ``entities`` to the control plane's nodes. Returns each entity's outcome by id
    (``created``, ``updated``, ``revived``, ``unchanged``, ``conflict``, ``invalid``, ``refused``)
    and how many nodes went ``gone``.

    ``listed_at`` set: ``entities`` is the whole listing, asked for then; the control plane's nodes it
    no longer lists (or lists outside the allowed networks) go ``gone``, unless an event saw them after
    ``listed_at``, and a ``gone`` node changed after ``listed_at`` (a REMOVE event) is not revived by
    it: the listing is older than that news. None: an event; only these entities' nodes are read and
    nothing else changes."""
    outcomes: dict[str, Outcome] = {}
    checked = _checked(control_plane, entities, outcomes)
    with transaction.atomic():
        rows = _Rows(control_plane=control_plane, actor=sync_actor(control_plane), listed_at=listed_at)
        nodes = Node.objects.select_for_update().filter(control_plane=control_plane).order_by()
        if listed_at is None:
            nodes = nodes.filter(entity_id__in=[entity.entity_id for entity, _ in checked])
        for node in nodes:
            rows.add(node)
        # Nodes elsewhere at the URLs of entities this control plane has no node for yet (or that
        # moved): a manual node there is a conflict, another registry node is taken over.
        wanted = {url for entity, url in checked if getattr(rows.by_entity.get(entity.entity_id), "url", None) != url}
        urls = sorted(wanted - set(rows.by_url))
        for start in range(0, len(urls), ID_BATCH):
            for node in Node.objects.select_for_update().filter(url__in=urls[start : start + ID_BATCH]).order_by():
                if node.pk not in rows.nodes:
                    rows.add(node)
        own = [pk for pk, node in rows.nodes.items() if node.control_plane_id == control_plane.pk]
        rows.load_aliases(own, of_control_plane=listed_at is not None)
        rows.load_aliases(list(rows.nodes))  # the nodes found at an entity's URL
        for entity, url in checked:
            try:
                outcomes[entity.entity_id] = _decide(rows, entity, url=url, now=now)
            except ValidationError as exc:
                # What the registry lists passes the same validation as every other interface
                # (model names, values that cannot be stored): an entity that fails it is skipped,
                # not half-stored.
                logger.warning("registry entity %s of %s is invalid: %s", entity.entity_id, control_plane, exc)
                outcomes[entity.entity_id] = "invalid"
        gone = 0
        if listed_at is not None:
            kept = {entity_id for entity_id, outcome in outcomes.items() if outcome != "refused"}
            gone = _go(rows, lambda node: node.entity_id not in kept and (node.last_seen_at or listed_at) <= listed_at)
        _write(rows, now=now)
        # Not a routing change: no audit, no bump. New nodes were created with it.
        if listed_at is not None:
            unseen = [
                pk
                for pk, node in rows.nodes.items()
                if node.control_plane_id == control_plane.pk and pk not in rows.seen
            ]
            Node.objects.filter(control_plane=control_plane).exclude(pk__in=unseen).update(last_seen_at=now)
        elif rows.seen:
            Node.objects.filter(pk__in=list(rows.seen)).update(last_seen_at=now)
    return outcomes, gone


def registry_gone_apply(*, control_plane: ControlPlane, entity_ids: Iterable[str]) -> int:
    """Mark the control plane's active or draining nodes for ``entity_ids`` as ``gone`` (a REMOVE
    event). Returns how many changed."""
    ids = set(entity_ids)
    with transaction.atomic():
        rows = _Rows(control_plane=control_plane, actor=sync_actor(control_plane))
        for node in Node.objects.select_for_update().filter(control_plane=control_plane, entity_id__in=list(ids)):
            rows.add(node)
        count = _go(rows, lambda node: node.entity_id in ids)
        _write(rows, now=timezone.now())
    return count
