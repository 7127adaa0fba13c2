"""Writes to nodes: create, update, upsert (engines re-register on restart), their served models, state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from django.core.exceptions import ValidationError
from django.db import transaction

from ..choices import AliasOrigin, NodeSource, NodeState
from ..engine_detect import with_detection
from ..models import Node, aliases_for_model, normalize_node_url
from ..validators import clean_model_names
from .audit import OPERATOR_INTERFACES, Actor, assign_fields, audited_delete, audited_save, diff_fields, field_values
from .concurrency import copy_row, current_with
from .routing import alias_create, alias_delete, alias_update

# Nodes whose fields their registry or the engine itself keeps up to date, unless an operator
# changed them by hand.
SELF_MAINTAINED_SOURCES = (NodeSource.REGISTRY, NodeSource.ENGINE)


def node_save(*, node: Node, actor: Actor, note: str = "") -> Node:
    """Save a node edited in place (the admin's forms); remembers which registry-owned fields an
    operator changed by hand so the sync (or the engine's own registration) leaves them alone."""
    if node.pk and actor.via in OPERATOR_INTERFACES:
        stored = field_values(Node.objects.get(pk=node.pk))
        edited = {
            name for name, (old, new) in diff_fields(stored, field_values(node)).items() if name != "operator_fields"
        }
        if "engine_type" in edited:
            # An operator chose the type: a detection still pending must not overwrite it.
            node.metadata = with_detection(node.metadata or {}, None)
        if node.source in SELF_MAINTAINED_SOURCES:
            node.operator_fields = sorted(set(node.operator_fields or []) | edited)
    saved, _ = audited_save(node, actor=actor, note=note)
    return saved


def node_create(
    *,
    actor: Actor,
    url: str,
    models: Iterable[str] = (),
    model_path: str = "",
    note: str = "",
    **fields: Any,
) -> Node:
    """Create a node and the aliases for the models it serves."""
    with transaction.atomic():
        node = assign_fields(Node(url=url), fields)
        node_save(node=node, actor=actor, note=note)
        node_set_models(node=node, actor=actor, models=models, model_path=model_path)
    return node


def node_update(*, node: Node, actor: Actor, note: str = "", **fields: Any) -> Node:
    """Change ``fields`` of the node as it is stored now (``nodes.services.concurrency``): a
    concurrent update of other fields is kept. ``node`` is given the saved values."""
    with transaction.atomic():
        saved = node_save(node=current_with(node, fields), actor=actor, note=note)
    return copy_row(node, saved)


def node_upsert(
    *,
    actor: Actor,
    url: str,
    models: Iterable[str] | None = None,
    model_path: str = "",
    note: str = "",
    **fields: Any,
) -> tuple[Node, bool]:
    """Create the node at ``url`` or update the one already there (engines re-register on restart).

    ``models=None`` keeps the node's models; a list replaces them. Returns ``(node, created)``.
    """
    normalized = normalize_node_url(url)
    with transaction.atomic():
        existing = Node.objects.select_for_update().filter(url=normalized).first()
        if existing is None:
            return node_create(actor=actor, url=normalized, models=models or (), model_path=model_path, **fields), True
        if existing.state == NodeState.GONE:
            fields.setdefault("state", NodeState.ACTIVE)
        node_update(node=existing, actor=actor, note=note, **fields)
        if models is not None:
            node_set_models(node=existing, actor=actor, models=models, model_path=model_path)
        return existing, False


def node_set_models(*, node: Node, actor: Actor, models: Iterable[str], model_path: str = "") -> None:
    """Make the node's served-model aliases exactly ``models`` (plus path and basename aliases);
    operator-added aliases on the node are kept."""
    try:
        served_names = clean_model_names(list(models))
    except ValidationError as exc:
        raise ValidationError({"models": exc.messages}) from None
    wanted: dict[str, tuple[str, str]] = {}
    for served in served_names:
        for name, origin in aliases_for_model(served, model_path):
            wanted.setdefault(name, (served, origin))
    with transaction.atomic():
        current = {a.name: a for a in node.aliases.exclude(origin=AliasOrigin.OPERATOR)}
        for name, alias in current.items():
            if name not in wanted:
                alias_delete(alias=alias, actor=actor)
        for name, (served, origin) in wanted.items():
            kept = current.get(name)
            if kept is None:
                alias_create(actor=actor, node=node, name=name, served_name=served, origin=origin)
            elif (kept.served_name, kept.origin) != (served, origin):
                alias_update(alias=kept, actor=actor, served_name=served, origin=origin)


def node_delete(*, node: Node, actor: Actor, note: str = "") -> None:
    audited_delete(node, actor=actor, note=note)


class NodeAction(Protocol):
    """The shape of the state changes an operator applies to one node at a time: ``node_drain``,
    ``node_enable`` and ``node_disable`` (the admin's actions and the REST API's take one of them)."""

    def __call__(self, *, node: Node, actor: Actor) -> Node: ...


def node_set_state(*, node: Node, actor: Actor, state: str, note: str = "") -> Node:
    if state not in NodeState.values:
        raise ValidationError({"state": f"Unknown state {state!r}."})
    return node_update(node=node, actor=actor, note=note, state=state)


def node_drain(*, node: Node, actor: Actor) -> Node:
    """Stop sending new requests to the node; requests in flight finish."""
    return node_set_state(node=node, actor=actor, state=NodeState.DRAINING)


def node_enable(*, node: Node, actor: Actor) -> Node:
    return node_set_state(node=node, actor=actor, state=NodeState.ACTIVE)


def node_disable(*, node: Node, actor: Actor) -> Node:
    return node_set_state(node=node, actor=actor, state=NodeState.DISABLED)


def node_approve(*, node: Node, actor: Actor) -> Node:
    """Let a node that joined a control plane with manual approval take traffic (``pending`` →
    ``active``). Refusing one is disabling it: it stays disabled when it registers again."""
    if node.state != NodeState.PENDING:
        raise ValidationError({"state": f"{node} is {node.state}, not pending approval."}, code="not_pending")
    return node_set_state(node=node, actor=actor, state=NodeState.ACTIVE, note="approved")
