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

import redis as redis_lib
from django.conf import settings
from django.utils import timezone
from redis.lock import Lock

from ..choices import SyncState
from ..live import keys as live_keys
from ..live.connection import client as redis_client
from ..masking import mask_credentials
from ..models import ControlPlane, default_registry_kinds
from ..registry import NanoCtrlClient, RegistryEntity, RegistryError
from .registry_diff import registry_diff_apply, registry_gone_apply

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


def registry_apply_entity(*, control_plane: ControlPlane, entity: RegistryEntity, now: datetime.datetime) -> str:
    """Create or update the node for one registry entity (an ADD event). Returns what happened:
    ``created``, ``updated``, ``revived``, ``unchanged``, ``conflict`` (the URL belongs to a manual
    node), ``invalid`` or ``refused`` (outside the control plane's allowed networks: not stored).

    A new node starts ``pending`` when the control plane's approval mode is manual
    (``nodes.admission.initial_state``); a known node keeps its state, except that a ``gone`` one
    (it was approved before) comes back ``active``. The rules are the sync's
    (``nodes.services.registry_diff``), applied to this one entity's rows."""
    outcomes, _ = registry_diff_apply(control_plane=control_plane, entities=[entity], now=now, listed_at=None)
    return outcomes[entity.entity_id]


def registry_mark_gone(*, control_plane: ControlPlane, entity_ids: Iterable[str]) -> int:
    """Mark the control plane's active or draining nodes for ``entity_ids`` as ``gone`` (a REMOVE
    event; kept, not deleted; an operator's disabled node stays disabled, a pending one stays
    pending). Returns how many changed."""
    return registry_gone_apply(control_plane=control_plane, entity_ids=entity_ids)


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
        # A control plane whose last sync failed keeps showing "failed" (and its error) while the
        # next attempt runs: during an outage an operator must not see it flicker to "syncing".
        ControlPlane.objects.filter(pk=control_plane.pk).exclude(sync_state=SyncState.FAILED).update(
            sync_state=SyncState.SYNCING
        )
        client = client or NanoCtrlClient(control_plane.address, timeout=settings.ROUTERPANEL_REGISTRY_TIMEOUT)
        entities: dict[str, RegistryEntity] = {}
        # What an event told after this moment is newer than the listing (``registry_diff_apply``).
        listed_at = timezone.now()
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
            result.listed = len(entities)
            outcomes, result.gone = registry_diff_apply(
                control_plane=control_plane, entities=list(entities.values()), now=timezone.now(), listed_at=listed_at
            )
            for entity_id, outcome in outcomes.items():
                entity = entities[entity_id]
                if outcome == "conflict":
                    result.conflicts += 1
                    result.problems.append(f"{entity.entity_id}: {entity.url} is a manual node; left alone")
                elif outcome == "invalid":
                    result.invalid += 1
                elif outcome == "refused":
                    # Not stored; a node it had before (the allow-list was narrowed) went gone.
                    result.refused += 1
                    result.problems.append(f"{entity.entity_id}: {entity.url} is outside the allowed networks")
                else:
                    setattr(result, outcome, getattr(result, outcome) + 1)
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
