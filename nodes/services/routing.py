"""Writes to the routing configuration: model aliases and route policies."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from ..models import ModelAlias, RoutePolicy
from .audit import Actor, assign_fields, audited_delete, audited_save
from .concurrency import copy_row, current_with


def alias_save(*, alias: ModelAlias, actor: Actor) -> ModelAlias:
    return audited_save(alias, actor=actor)[0]


def alias_create(*, actor: Actor, **fields: Any) -> ModelAlias:
    return alias_save(alias=assign_fields(ModelAlias(), fields), actor=actor)


def alias_update(*, alias: ModelAlias, actor: Actor, **fields: Any) -> ModelAlias:
    """Change ``fields`` of the alias as it is stored now (``nodes.services.concurrency``)."""
    with transaction.atomic():
        return copy_row(alias, alias_save(alias=current_with(alias, fields), actor=actor))


def alias_delete(*, alias: ModelAlias, actor: Actor) -> None:
    audited_delete(alias, actor=actor)


def policy_save(*, policy: RoutePolicy, actor: Actor) -> RoutePolicy:
    return audited_save(policy, actor=actor)[0]


def policy_create(*, actor: Actor, **fields: Any) -> RoutePolicy:
    return policy_save(policy=assign_fields(RoutePolicy(), fields), actor=actor)


def policy_update(*, policy: RoutePolicy, actor: Actor, **fields: Any) -> RoutePolicy:
    """Change ``fields`` of the policy as it is stored now (``nodes.services.concurrency``)."""
    with transaction.atomic():
        return copy_row(policy, policy_save(policy=current_with(policy, fields), actor=actor))


def policy_delete(*, policy: RoutePolicy, actor: Actor) -> None:
    if policy.model == "":
        raise ValidationError("The global default policy cannot be deleted; edit it instead.")
    audited_delete(policy, actor=actor)
