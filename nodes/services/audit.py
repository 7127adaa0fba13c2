"""The audit trail and the configuration version: what every write goes through.

``audited_save`` and ``audited_delete`` validate, write, record a ``ChangeRecord`` with the
difference to the stored row, and — when the change affects routing — bump the configuration
version (``config_version_bump``, the only place that does), which the web workers pick up to
rebuild their routing snapshot (docs/decisions/0003-routing-snapshot-and-config-version.md).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, User
from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, transaction
from django.db.models import F

from ..choices import ChangeAction, ChangeVia
from ..live.config_version import publish_config_version
from ..masking import mask_credentials
from ..models import ChangeRecord, ConfigVersion

M = TypeVar("M", bound=models.Model)

# Interfaces through which a person changes things (as opposed to the sync or the health checker).
OPERATOR_INTERFACES = frozenset({ChangeVia.ADMIN, ChangeVia.API, ChangeVia.COMPAT})

# Fields that never appear in an audit diff: they change on every save or are secret.
_UNAUDITED_FIELDS = {
    "created_at",
    "updated_at",
    "key_hash",
    "registration_token_hash",  # the prefix is audited: a new or revoked token shows there
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
    user: User | None = None  # Django's User is the AUTH_USER_MODEL, which ChangeRecord.actor points at

    @classmethod
    def for_user(cls, user: AbstractBaseUser | AnonymousUser | None, via: str) -> Actor:
        if not isinstance(user, User) or not user.is_authenticated:
            return cls(label="anonymous", via=via)
        return cls(label=user.get_username(), via=via, user=user)

    @classmethod
    def system(cls, label: str = "system") -> Actor:
        return cls(label=label, via=ChangeVia.SYSTEM)


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


def field_values(obj: models.Model) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for model_field in obj._meta.concrete_fields:
        if model_field.primary_key or model_field.name in _UNAUDITED_FIELDS:
            continue
        values[model_field.name] = _jsonable(getattr(obj, model_field.attname))
    return values


def diff_fields(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    return {name: [before.get(name), value] for name, value in after.items() if before.get(name) != value}


def _masked(value: Any) -> Any:
    """``value`` with the password of any URL in it masked (the audit trail never stores secrets)."""
    if isinstance(value, str):
        return mask_credentials(value)
    if isinstance(value, list):
        return [_masked(item) for item in value]
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    return value


def change_record(
    actor: Actor, action: str, obj: models.Model, changes: dict[str, Any], note: str = ""
) -> ChangeRecord:
    """One audit record, not yet stored (``record_change`` stores one; the registry sync stores its
    records in bulk). Values are masked (``nodes.masking``): a Redis URL's password shows as
    ``***``; that it changed still shows, since the difference was taken before masking."""
    return ChangeRecord(
        actor=actor.user,
        actor_label=actor.label[:200],
        via=actor.via,
        action=action,
        object_type=obj._meta.model_name or "",  # set on every model class; None only before that
        object_id=str(obj.pk),
        object_repr=mask_credentials(str(obj))[:500],
        changes=_masked(changes),
        note=mask_credentials(note)[:500],
    )


def record_change(actor: Actor, action: str, obj: models.Model, changes: dict[str, Any], note: str = "") -> None:
    """Store one audit record (``change_record``)."""
    change_record(actor, action, obj, changes, note).save()


def audited_save(
    obj: M, *, actor: Actor, note: str = "", affects_routing: bool = True
) -> tuple[M, dict[str, list[Any]]]:
    """Validate and save ``obj``; audit the difference to the stored row; bump the version.

    Returns the object and the audited changes (empty when nothing changed, in which case nothing
    is recorded and the version stays).
    """
    model = type(obj)
    creating = obj._state.adding or obj.pk is None
    with transaction.atomic():
        # "before" is the row as it is now, locked until the write commits: two writers never both
        # record the same old value (docs/architecture.md, "Concurrent writers"). Validating inside
        # the transaction makes the uniqueness checks see the rows committed before it.
        before = {} if creating else field_values(model._default_manager.select_for_update().get(pk=obj.pk))
        obj.full_clean()
        try:
            with transaction.atomic():
                obj.save()
        except IntegrityError as exc:
            # A unique row created by a writer that committed after our checks ran (PostgreSQL;
            # SQLite's IMMEDIATE transactions serialise the checks): a 400 naming it, not a 500.
            raise ValidationError(
                f"A {model._meta.verbose_name} with these values already exists ({exc}).", code="unique"
            ) from None
        changes = diff_fields(before, field_values(obj))
        if creating or changes:
            record_change(actor, ChangeAction.CREATE if creating else ChangeAction.UPDATE, obj, changes, note)
            if affects_routing:
                config_version_bump()
    return obj, changes


def audited_delete(obj: models.Model, *, actor: Actor, note: str = "", affects_routing: bool = True) -> None:
    with transaction.atomic():
        record_change(actor, ChangeAction.DELETE, obj, {}, note)
        obj.delete()
        if affects_routing:
            config_version_bump()


def assign_fields(obj: M, fields: dict[str, Any]) -> M:
    for name, value in fields.items():
        if name not in {f.name for f in obj._meta.fields}:
            raise ValidationError({name: "Unknown field."})
        setattr(obj, name, value)
    return obj
