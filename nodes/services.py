"""Writes to the registry. Every interface (admin, REST API, DLRouter compat, registry sync, commands)
calls these functions, so each change is validated, audited and — when it affects routing — bumps
the configuration version exactly once, in one place (``config_version_bump``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import redis as redis_lib
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.db.models import F
from django.utils import timezone

from . import health
from .choices import AliasOrigin, ChangeAction, ChangeVia, NodeHealth, NodeSource, NodeState, SyncState
from .live import keys as live_keys
from .live.config_version import publish_config_version
from .live.connection import client as redis_client
from .models import (
    ApiKey,
    ChangeRecord,
    ConfigVersion,
    ControlPlane,
    ModelAlias,
    Node,
    RoutePolicy,
    aliases_for_model,
    default_registry_kinds,
    generate_api_key,
    normalize_node_url,
)
from .registry import NanoCtrlClient, RegistryEntity, RegistryError
from .schedules import schedule_control_plane, unschedule_control_plane

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=models.Model)

# Interfaces through which a person changes things (as opposed to the sync or the health checker).
OPERATOR_INTERFACES = frozenset({ChangeVia.ADMIN, ChangeVia.API, ChangeVia.COMPAT})

# Fields that never appear in an audit diff: they change on every save or are secret.
_UNAUDITED_FIELDS = {
    "created_at",
    "updated_at",
    "key_hash",
    # Health bookkeeping changes every probe; only transitions of ``health`` itself are audited.
    "consecutive_failures",
    "consecutive_successes",
    "last_checked_at",
}


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
    transaction.on_commit(lambda: publish_config_version(version))
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
    for model_field in obj._meta.concrete_fields:
        if model_field.primary_key or model_field.name in _UNAUDITED_FIELDS:
            continue
        values[model_field.name] = _jsonable(getattr(obj, model_field.attname))
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


def node_save(*, node: Node, actor: Actor, note: str = "") -> Node:
    """Save a node edited in place (the admin's forms); remembers which registry-owned fields an
    operator changed by hand so the sync leaves them alone."""
    if node.pk and node.source == NodeSource.REGISTRY and actor.via in OPERATOR_INTERFACES:
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
        node_save(node=node, actor=actor, note=note)
        node_set_models(node=node, actor=actor, models=models, model_path=model_path)
    return node


def node_update(*, node: Node, actor: Actor, note: str = "", **fields: Any) -> Node:
    return node_save(node=_assign(node, fields), actor=actor, note=note)


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


def alias_save(*, alias: ModelAlias, actor: Actor) -> ModelAlias:
    return _save(alias, actor=actor)[0]


def alias_create(*, actor: Actor, **fields: Any) -> ModelAlias:
    return alias_save(alias=_assign(ModelAlias(), fields), actor=actor)


def alias_update(*, alias: ModelAlias, actor: Actor, **fields: Any) -> ModelAlias:
    return alias_save(alias=_assign(alias, fields), actor=actor)


def alias_delete(*, alias: ModelAlias, actor: Actor) -> None:
    _delete(alias, actor=actor)


def policy_save(*, policy: RoutePolicy, actor: Actor) -> RoutePolicy:
    return _save(policy, actor=actor)[0]


def policy_create(*, actor: Actor, **fields: Any) -> RoutePolicy:
    return policy_save(policy=_assign(RoutePolicy(), fields), actor=actor)


def policy_update(*, policy: RoutePolicy, actor: Actor, **fields: Any) -> RoutePolicy:
    return policy_save(policy=_assign(policy, fields), actor=actor)


def policy_delete(*, policy: RoutePolicy, actor: Actor) -> None:
    if policy.model == "":
        raise ValidationError("The global default policy cannot be deleted; edit it instead.")
    _delete(policy, actor=actor)


def control_plane_save(*, control_plane: ControlPlane, actor: Actor) -> ControlPlane:
    """Save a control plane and keep its periodic sync task (django-celery-beat) in step."""
    with transaction.atomic():
        _save(control_plane, actor=actor)
        schedule_control_plane(control_plane)
    return control_plane


def control_plane_create(*, actor: Actor, **fields: Any) -> ControlPlane:
    return control_plane_save(control_plane=_assign(ControlPlane(), fields), actor=actor)


def control_plane_update(*, control_plane: ControlPlane, actor: Actor, **fields: Any) -> ControlPlane:
    return control_plane_save(control_plane=_assign(control_plane, fields), actor=actor)


def control_plane_delete(*, control_plane: ControlPlane, actor: Actor) -> None:
    with transaction.atomic():
        unschedule_control_plane(control_plane.pk)
        _delete(control_plane, actor=actor)


# ---------------------------------------------------------------------------------------------
# API keys
# ---------------------------------------------------------------------------------------------


def api_key_create(*, actor: Actor, name: str, plaintext: str | None = None, **fields: Any) -> tuple[ApiKey, str]:
    """Create a proxy key. Returns the row and the plaintext key, which is never stored or shown again."""
    plaintext = plaintext or generate_api_key()
    api_key = _assign(ApiKey(name=name, created_by=actor.user), fields)
    api_key.set_plaintext(plaintext)
    if ApiKey.objects.filter(key_hash=api_key.key_hash).exists():
        raise ValidationError({"key": "This key is already registered."})
    _save(api_key, actor=actor)
    return api_key, plaintext


def api_key_save(*, api_key: ApiKey, actor: Actor) -> ApiKey:
    return _save(api_key, actor=actor)[0]


def api_key_update(*, api_key: ApiKey, actor: Actor, **fields: Any) -> ApiKey:
    return api_key_save(api_key=_assign(api_key, fields), actor=actor)


def api_key_delete(*, api_key: ApiKey, actor: Actor) -> None:
    _delete(api_key, actor=actor)


def api_key_record_usage() -> int:
    """Copy the proxy's record of when each key was last used (Redis) into ``ApiKey.last_used_at``.
    Bookkeeping, not a configuration change: no audit record, no version bump. Returns rows updated."""
    try:
        raw = redis_client().hgetall(live_keys.KEYS_LAST_USED)
    except redis_lib.RedisError as exc:
        logger.warning("could not read API key usage from Redis: %s", exc)
        return 0
    updated = 0
    for key_id, stamp in raw.items():
        try:
            when = datetime.datetime.fromtimestamp(float(stamp), tz=datetime.UTC)
            pk = int(key_id)
        except ValueError:
            continue
        updated += (
            ApiKey.objects.filter(pk=pk)
            .filter(models.Q(last_used_at__isnull=True) | models.Q(last_used_at__lt=when))
            .update(last_used_at=when)
        )
    return updated


# ---------------------------------------------------------------------------------------------
# Registry sync (dlslime-ctrl / NanoCtrl)
# ---------------------------------------------------------------------------------------------

SYNC_LOCK_TIMEOUT = 120  # seconds; a crashed sync's lock expires by itself


@dataclass
class SyncResult:
    """What one sync of one control plane did."""

    control_plane_id: int
    ok: bool = False
    skipped: bool = False
    reason: str = ""
    listed: int = 0
    created: int = 0
    updated: int = 0
    revived: int = 0
    gone: int = 0
    unchanged: int = 0
    conflicts: int = 0
    invalid: int = 0
    duration_ms: int = 0
    problems: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        names = ("listed", "created", "updated", "revived", "gone", "unchanged", "conflicts", "invalid")
        return {name: getattr(self, name) for name in names}

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.reason}"
        if not self.ok:
            return f"failed: {self.reason}"
        return ", ".join(f"{k} {v}" for k, v in self.counts().items()) + f" in {self.duration_ms} ms"


def _sync_actor(control_plane: ControlPlane) -> Actor:
    return Actor(label=f"registry-sync:{control_plane.name}"[:200], via=ChangeVia.SYNC)


def registry_apply_entity(*, control_plane: ControlPlane, entity: RegistryEntity, now: datetime.datetime) -> str:
    """Create or update the node for one registry entity. Returns what happened: ``created``,
    ``updated``, ``revived``, ``unchanged`` or ``conflict`` (the URL belongs to a manual node)."""
    actor = _sync_actor(control_plane)
    try:
        url = normalize_node_url(entity.url)
    except ValidationError:
        return "invalid"
    imported = {
        "url": url,
        "role": entity.role,
        "engine_type": control_plane.engine_type,
        "kind": entity.kind,
        "scope": control_plane.scope,
    }
    served = entity.served_model_name
    with transaction.atomic():
        node = Node.objects.select_for_update().filter(control_plane=control_plane, entity_id=entity.entity_id).first()
        if node is None:
            node = Node.objects.select_for_update().filter(url=url).first()
            if node is not None and node.source != NodeSource.REGISTRY:
                return "conflict"  # never touch an operator's manual or static node
        if node is None:
            node = node_create(
                actor=actor,
                models=[served] if served else [],
                model_path=entity.model_path,
                source=NodeSource.REGISTRY,
                control_plane=control_plane,
                entity_id=entity.entity_id,
                last_seen_at=now,
                metadata={"registry": entity.metadata},
                **imported,
            )
            return "created"

        owned = {k: v for k, v in imported.items() if k not in (node.operator_fields or [])}
        changes: dict[str, Any] = {k: v for k, v in owned.items() if getattr(node, k) != v}
        if node.control_plane_id != control_plane.pk or node.entity_id != entity.entity_id:
            changes.update(control_plane=control_plane, entity_id=entity.entity_id)
        if node.metadata.get("registry") != entity.metadata and "metadata" not in (node.operator_fields or []):
            changes["metadata"] = {**node.metadata, "registry": entity.metadata}
        revived = node.state == NodeState.GONE
        if revived:
            changes["state"] = NodeState.ACTIVE
        if changes:
            node_update(node=node, actor=actor, **changes)
        before = set(node.aliases.exclude(origin=AliasOrigin.OPERATOR).values_list("name", "served_name"))
        if "aliases" not in (node.operator_fields or []):
            node_set_models(node=node, actor=actor, models=[served] if served else [], model_path=entity.model_path)
        after = set(node.aliases.exclude(origin=AliasOrigin.OPERATOR).values_list("name", "served_name"))
        Node.objects.filter(pk=node.pk).update(last_seen_at=now)  # not a routing change: no audit, no bump
    if revived:
        return "revived"
    return "updated" if changes or before != after else "unchanged"


def registry_mark_gone(*, control_plane: ControlPlane, entity_ids: Iterable[str]) -> int:
    """Mark the control plane's active or draining nodes for ``entity_ids`` as ``gone`` (kept, not
    deleted; an operator's disabled node stays disabled). Returns how many changed."""
    actor = _sync_actor(control_plane)
    count = 0
    nodes = Node.objects.filter(
        control_plane=control_plane,
        source=NodeSource.REGISTRY,
        entity_id__in=list(entity_ids),
        state__in=[NodeState.ACTIVE, NodeState.DRAINING],
    )
    for node in nodes:
        node_update(node=node, actor=actor, state=NodeState.GONE, note="missing from the registry")
        count += 1
    return count


def _sync_lock(control_plane: ControlPlane):
    return redis_client().lock(live_keys.sync_lock_key(control_plane.pk), timeout=SYNC_LOCK_TIMEOUT, blocking=False)


def registry_sync(*, control_plane_id: int, client: NanoCtrlClient | None = None) -> SyncResult:
    """Mirror one control plane's registry into the node table.

    One run per control plane at a time across every worker and host (a Redis lock). A registry
    that cannot be listed changes no node: the control plane goes ``failed`` with the reason and the
    next run recovers by itself. Nodes missing from a successful listing are marked ``gone``.
    """
    result = SyncResult(control_plane_id=control_plane_id)
    control_plane = ControlPlane.objects.filter(pk=control_plane_id).first()
    if control_plane is None:
        result.skipped, result.reason = True, "the control plane no longer exists"
        return result

    lock = _sync_lock(control_plane)
    try:
        acquired = lock.acquire()
    except redis_lib.RedisError as exc:
        result.skipped, result.reason = True, f"Redis is unavailable for the sync lock ({exc})"
        logger.warning("sync of %s skipped: %s", control_plane, result.reason)
        return result
    if not acquired:
        result.skipped, result.reason = True, "another sync of this control plane is running"
        logger.info("sync of %s skipped: %s", control_plane, result.reason)
        return result

    started = time.monotonic()
    try:
        ControlPlane.objects.filter(pk=control_plane.pk).update(sync_state=SyncState.SYNCING)
        client = client or NanoCtrlClient(control_plane.address, timeout=settings.ROUTERPANEL_REGISTRY_TIMEOUT)
        entities: dict[str, RegistryEntity] = {}
        try:
            for kind in control_plane.kinds or default_registry_kinds():
                listed, problems = client.list_entities(kind=kind, scope=control_plane.scope)
                result.invalid += len(problems)
                result.problems.extend(problems)
                for entity in listed:
                    entities[entity.entity_id] = entity
        except RegistryError as exc:
            result.reason = str(exc)
        else:
            now = timezone.now()
            result.listed = len(entities)
            for entity in entities.values():
                outcome = registry_apply_entity(control_plane=control_plane, entity=entity, now=now)
                if outcome == "conflict":
                    result.conflicts += 1
                    result.problems.append(f"{entity.entity_id}: {entity.url} is a manual node; left alone")
                elif outcome == "invalid":
                    result.invalid += 1
                else:
                    setattr(result, outcome, getattr(result, outcome) + 1)
            missing = (
                Node.objects.filter(control_plane=control_plane, source=NodeSource.REGISTRY)
                .exclude(entity_id__in=list(entities))
                .values_list("entity_id", flat=True)
            )
            result.gone = registry_mark_gone(control_plane=control_plane, entity_ids=list(missing))
            result.ok = True
    except Exception as exc:  # an unexpected bug must still leave the state machine truthful
        result.ok, result.reason = False, f"{exc.__class__.__name__}: {exc}"
        logger.exception("sync of %s crashed", control_plane)
    finally:
        result.duration_ms = int((time.monotonic() - started) * 1000)
        ControlPlane.objects.filter(pk=control_plane.pk).update(
            sync_state=SyncState.OK if result.ok else SyncState.FAILED,
            last_sync_at=timezone.now(),
            last_sync_duration_ms=result.duration_ms,
            last_sync_counts=result.counts(),
            last_sync_error="" if result.ok else result.reason[:2000],
        )
        with contextlib.suppress(redis_lib.RedisError):  # expired, or Redis gone: its timeout frees it
            lock.release()
    log = logger.info if result.ok else logger.warning
    log("sync of %s: %s", control_plane, result.summary())
    return result


# ---------------------------------------------------------------------------------------------
# Active health checks
# ---------------------------------------------------------------------------------------------

HEALTH_ACTOR = Actor(label="health-check", via=ChangeVia.SYSTEM)


def health_check_nodes(*, node_ids: Iterable[int] | None = None) -> health.HealthReport:
    """Probe the active and draining nodes (or just ``node_ids``, for "probe now") and apply the
    hysteresis. The periodic run holds a Redis lock so only one runner probes at a time."""
    report = health.HealthReport()
    with health.single_runner(enabled=node_ids is None) as acquired:
        if not acquired:
            report.skipped, report.reason = True, "another health check is running"
            logger.info("health check skipped: %s", report.reason)
            return report
        nodes = Node.objects.all() if node_ids is not None else Node.objects.filter(state__in=health.PROBED_STATES)
        if node_ids is not None:
            nodes = nodes.filter(pk__in=list(node_ids))
        nodes = list(nodes)
        if not nodes:
            return report
        probes = asyncio.run(health.probe_all([n.url for n in nodes], timeout=settings.ROUTERPANEL_HEALTH_TIMEOUT))
        now = timezone.now()
        for node, probe in zip(nodes, probes, strict=True):
            new_health, failures, successes = health.next_health(node, probe)
            Node.objects.filter(pk=node.pk).update(
                consecutive_failures=failures, consecutive_successes=successes, last_checked_at=now
            )
            if new_health != node.health:
                node.refresh_from_db()
                node_update(node=node, actor=HEALTH_ACTOR, health=new_health, note=probe.detail[:200])
                report.transitions.append(f"{node.url}: {new_health} ({probe.detail})")
                logger.info("node %s is now %s: %s", node.url, new_health, probe.detail)
            report.checked += 1
            report.healthy += new_health == NodeHealth.HEALTHY
            report.unhealthy += new_health == NodeHealth.UNHEALTHY
        health.record_history(list(zip(nodes, probes, strict=True)))
    return report
