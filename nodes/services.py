"""Writes to the registry. Every interface (admin, REST API, DLRouter compat, registry sync, commands)
calls these functions, so each change is validated, audited and — when it affects routing — bumps
the configuration version exactly once, in one place (``config_version_bump``).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.db.models import F

from . import bus
from .choices import AliasOrigin, ChangeAction, ChangeVia, NodeSource, NodeState
from .models import (
    ApiKey,
    ChangeRecord,
    ConfigVersion,
    ControlPlane,
    ModelAlias,
    Node,
    RoutePolicy,
    aliases_for_model,
    generate_api_key,
    normalize_node_url,
)

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=models.Model)

# Fields that never appear in an audit diff: they change on every save or are secret.
_UNAUDITED_FIELDS = {"created_at", "updated_at", "key_hash"}


@dataclass(frozen=True)
class Actor:
    """Who or what makes a change, and through which interface."""

    label: str
    via: str
    user: AbstractBaseUser | None = None

    @classmethod
    def for_user(cls, user: AbstractBaseUser | AnonymousUser | None, via: str) -> Actor:
        if user is None or not user.is_authenticated:
            return cls(label="anonymous", via=via)
        return cls(label=user.get_username(), via=via, user=user)  # type: ignore[arg-type]

    @classmethod
    def system(cls, label: str = "system") -> Actor:
        return cls(label=label, via=ChangeVia.SYSTEM)


# ---------------------------------------------------------------------------------------------
# Configuration version and audit
# ---------------------------------------------------------------------------------------------


def config_version_bump() -> int:
    """Advance the configuration version and, once the transaction commits, publish it on Redis.

    This is the only place that bumps the version. The proxy rebuilds its routing snapshot when the
    published version changes; a Redis outage only delays that (the proxy also polls), it never
    fails the write.
    """
    updated = ConfigVersion.objects.filter(pk=1).update(version=F("version") + 1)
    if not updated:
        ConfigVersion.objects.get_or_create(pk=1, defaults={"version": 0})
        ConfigVersion.objects.filter(pk=1).update(version=F("version") + 1)
    version = ConfigVersion.objects.values_list("version", flat=True).get(pk=1)
    transaction.on_commit(lambda: bus.publish_config_version(version))
    return version


def config_version_current() -> int:
    return ConfigVersion.objects.filter(pk=1).values_list("version", flat=True).first() or 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def _field_values(obj: models.Model) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in obj._meta.concrete_fields:
        if field.primary_key or field.name in _UNAUDITED_FIELDS:
            continue
        values[field.name] = _jsonable(getattr(obj, field.attname))
    return values


def _diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    return {name: [before.get(name), value] for name, value in after.items() if before.get(name) != value}


def _record(actor: Actor, action: str, obj: models.Model, changes: dict[str, Any], note: str = "") -> None:
    ChangeRecord.objects.create(
        actor=actor.user,
        actor_label=actor.label[:200],
        via=actor.via,
        action=action,
        object_type=obj._meta.model_name,
        object_id=str(obj.pk),
        object_repr=str(obj)[:500],
        changes=changes,
        note=note[:500],
    )


def _save(obj: M, *, actor: Actor, note: str = "", affects_routing: bool = True) -> tuple[M, dict[str, list[Any]]]:
    """Validate and save ``obj``; audit the difference to the stored row; bump the version.

    Returns the object and the audited changes (empty when nothing changed, in which case nothing
    is recorded and the version stays).
    """
    model = type(obj)
    creating = obj._state.adding or obj.pk is None
    before = {} if creating else _field_values(model.objects.get(pk=obj.pk))
    obj.full_clean()
    with transaction.atomic():
        obj.save()
        changes = _diff(before, _field_values(obj))
        if creating or changes:
            _record(actor, ChangeAction.CREATE if creating else ChangeAction.UPDATE, obj, changes, note)
            if affects_routing:
                config_version_bump()
    return obj, changes


def _delete(obj: models.Model, *, actor: Actor, note: str = "", affects_routing: bool = True) -> None:
    with transaction.atomic():
        _record(actor, ChangeAction.DELETE, obj, {}, note)
        obj.delete()
        if affects_routing:
            config_version_bump()


def _assign(obj: M, fields: dict[str, Any]) -> M:
    for name, value in fields.items():
        if name not in {f.name for f in obj._meta.fields}:
            raise ValidationError({name: "Unknown field."})
        setattr(obj, name, value)
    return obj


# ---------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------


def node_save(node: Node, *, actor: Actor, note: str = "") -> Node:
    """Save a node edited in place (the admin's forms); remembers which registry-owned fields an
    operator changed by hand so the sync leaves them alone."""
    if node.pk and node.source == NodeSource.REGISTRY and actor.via != ChangeVia.SYNC:
        stored = _field_values(Node.objects.get(pk=node.pk))
        edited = {name for name, (old, new) in _diff(stored, _field_values(node)).items() if name != "operator_fields"}
        node.operator_fields = sorted(set(node.operator_fields or []) | edited)
    saved, _ = _save(node, actor=actor, note=note)
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
        node = _assign(Node(url=url), fields)
        node_save(node, actor=actor, note=note)
        node_set_models(node=node, actor=actor, models=models, model_path=model_path)
    return node


def node_update(*, node: Node, actor: Actor, note: str = "", **fields: Any) -> Node:
    return node_save(_assign(node, fields), actor=actor, note=note)


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
    wanted: dict[str, tuple[str, str]] = {}
    for served in dict.fromkeys(m.strip() for m in models if m and m.strip()):
        for name, origin in aliases_for_model(served, model_path):
            wanted.setdefault(name, (served, origin))
    with transaction.atomic():
        current = {a.name: a for a in node.aliases.exclude(origin=AliasOrigin.OPERATOR)}
        for name, alias in current.items():
            if name not in wanted:
                alias_delete(alias=alias, actor=actor)
        for name, (served, origin) in wanted.items():
            alias = current.get(name)
            if alias is None:
                alias_create(actor=actor, node=node, name=name, served_name=served, origin=origin)
            elif (alias.served_name, alias.origin) != (served, origin):
                alias_update(alias=alias, actor=actor, served_name=served, origin=origin)


def node_delete(*, node: Node, actor: Actor, note: str = "") -> None:
    _delete(node, actor=actor, note=note)


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


# ---------------------------------------------------------------------------------------------
# Aliases, policies, control planes
# ---------------------------------------------------------------------------------------------


def alias_save(alias: ModelAlias, *, actor: Actor) -> ModelAlias:
    return _save(alias, actor=actor)[0]


def alias_create(*, actor: Actor, **fields: Any) -> ModelAlias:
    return alias_save(_assign(ModelAlias(), fields), actor=actor)


def alias_update(*, alias: ModelAlias, actor: Actor, **fields: Any) -> ModelAlias:
    return alias_save(_assign(alias, fields), actor=actor)


def alias_delete(*, alias: ModelAlias, actor: Actor) -> None:
    _delete(alias, actor=actor)


def policy_save(policy: RoutePolicy, *, actor: Actor) -> RoutePolicy:
    return _save(policy, actor=actor)[0]


def policy_create(*, actor: Actor, **fields: Any) -> RoutePolicy:
    return policy_save(_assign(RoutePolicy(), fields), actor=actor)


def policy_update(*, policy: RoutePolicy, actor: Actor, **fields: Any) -> RoutePolicy:
    return policy_save(_assign(policy, fields), actor=actor)


def policy_delete(*, policy: RoutePolicy, actor: Actor) -> None:
    if policy.model == "":
        raise ValidationError("The global default policy cannot be deleted; edit it instead.")
    _delete(policy, actor=actor)


def control_plane_save(control_plane: ControlPlane, *, actor: Actor) -> ControlPlane:
    return _save(control_plane, actor=actor)[0]


def control_plane_create(*, actor: Actor, **fields: Any) -> ControlPlane:
    return control_plane_save(_assign(ControlPlane(), fields), actor=actor)


def control_plane_update(*, control_plane: ControlPlane, actor: Actor, **fields: Any) -> ControlPlane:
    return control_plane_save(_assign(control_plane, fields), actor=actor)


def control_plane_delete(*, control_plane: ControlPlane, actor: Actor) -> None:
    _delete(control_plane, actor=actor)


# ---------------------------------------------------------------------------------------------
# API keys
# ---------------------------------------------------------------------------------------------


def api_key_create(*, actor: Actor, name: str, plaintext: str | None = None, **fields: Any) -> tuple[ApiKey, str]:
    """Create a proxy key. Returns the row and the plaintext key, which is never stored or shown again."""
    plaintext = plaintext or generate_api_key()
    key = _assign(ApiKey(name=name, created_by=actor.user), fields)
    key.set_plaintext(plaintext)
    if ApiKey.objects.filter(key_hash=key.key_hash).exists():
        raise ValidationError({"key": "This key is already registered."})
    _save(key, actor=actor)
    return key, plaintext


def api_key_save(key: ApiKey, *, actor: Actor) -> ApiKey:
    return _save(key, actor=actor)[0]


def api_key_update(*, key: ApiKey, actor: Actor, **fields: Any) -> ApiKey:
    return api_key_save(_assign(key, fields), actor=actor)


def api_key_delete(*, key: ApiKey, actor: Actor) -> None:
    _delete(key, actor=actor)
