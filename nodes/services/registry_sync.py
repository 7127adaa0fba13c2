"""The registry sync: mirror a NanoCtrl (dlslime-ctrl) registry into the node table.

``registry_sync`` is the one sync: the Celery task, the ``sync_nodes`` command and the admin's
"Sync now" call it; the registry listener applies single entities with ``registry_apply_entity``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis as redis_lib
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from redis.lock import Lock

from .. import admission
from ..choices import AliasOrigin, ChangeVia, NodeSource, NodeState, SyncState
from ..live import keys as live_keys
from ..live.connection import client as redis_client
from ..masking import mask_credentials
from ..models import ControlPlane, Node, default_registry_kinds
from ..networks import validate_node_url
from ..registry import NanoCtrlClient, RegistryEntity, RegistryError
from .audit import Actor
from .nodes import node_create, node_set_models, node_update

logger = logging.getLogger(__name__)


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
    refused: int = 0
    duration_ms: int = 0
    problems: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        names = ("listed", "created", "updated", "revived", "gone", "unchanged", "conflicts", "invalid", "refused")
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
    ``updated``, ``revived``, ``unchanged``, ``conflict`` (the URL belongs to a manual node),
    ``invalid`` or ``refused`` (outside the control plane's allowed networks: not stored).

    A new node starts ``pending`` when the control plane's approval mode is manual
    (``nodes.admission.initial_state``); a known node keeps its state, except that a ``gone`` one
    (it was approved before) comes back ``active``."""
    try:
        url = validate_node_url(entity.url)
    except ValidationError:
        return "invalid"
    try:
        admission.check_allowed(control_plane, url=url)
    except admission.AdmissionRefused as exc:
        logger.warning("registry entity %s of %s refused: %s", entity.entity_id, control_plane, exc)
        return "refused"
    try:
        return _apply_entity(control_plane, entity, url=url, now=now)
    except ValidationError as exc:
        # What the registry lists passes the same validation as every other interface (model
        # names, values that cannot be stored): an entity that fails it is skipped, not half-stored.
        logger.warning("registry entity %s of %s is invalid: %s", entity.entity_id, control_plane, exc)
        return "invalid"


def _apply_entity(control_plane: ControlPlane, entity: RegistryEntity, *, url: str, now: datetime.datetime) -> str:
    actor = _sync_actor(control_plane)
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
                state=admission.initial_state(control_plane),
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
    deleted; an operator's disabled node stays disabled, a pending one stays pending: it was never
    approved, and coming back ``gone`` → ``active`` would skip the approval). Returns how many changed."""
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


def _sync_lock(control_plane: ControlPlane) -> Lock:
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
    if control_plane.is_direct:
        result.skipped, result.reason = True, "a direct-registration control plane has no registry to sync"
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
            kept: list[str] = []
            for entity in entities.values():
                outcome = registry_apply_entity(control_plane=control_plane, entity=entity, now=now)
                if outcome == "conflict":
                    result.conflicts += 1
                    result.problems.append(f"{entity.entity_id}: {entity.url} is a manual node; left alone")
                elif outcome == "invalid":
                    result.invalid += 1
                elif outcome == "refused":
                    # Not stored; a node it had before (the allow-list was narrowed) goes below.
                    result.refused += 1
                    result.problems.append(f"{entity.entity_id}: {entity.url} is outside the allowed networks")
                else:
                    setattr(result, outcome, getattr(result, outcome) + 1)
                if outcome != "refused":
                    kept.append(entity.entity_id)
            missing = (
                Node.objects.filter(control_plane=control_plane, source=NodeSource.REGISTRY)
                .exclude(entity_id__in=kept)
                .values_list("entity_id", flat=True)
            )
            result.gone = registry_mark_gone(control_plane=control_plane, entity_ids=list(missing))
            result.ok = True
    except Exception as exc:  # an unexpected bug must still leave the state machine truthful
        result.ok, result.reason = False, f"{exc.__class__.__name__}: {exc}"
        logger.exception("sync of %s crashed", control_plane)
    finally:
        result.reason = mask_credentials(result.reason)
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
