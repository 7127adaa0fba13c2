"""Control planes: create, change and delete them; a save keeps the periodic sync task
(django-celery-beat) in step."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from ..models import ControlPlane
from ..schedules import schedule_control_plane, unschedule_control_plane
from .audit import Actor, assign_fields, audited_delete, audited_save


def control_plane_save(*, control_plane: ControlPlane, actor: Actor) -> ControlPlane:
    """Save a control plane and keep its periodic sync task (django-celery-beat) in step."""
    with transaction.atomic():
        audited_save(control_plane, actor=actor)
        schedule_control_plane(control_plane)
    return control_plane


def control_plane_create(*, actor: Actor, **fields: Any) -> ControlPlane:
    return control_plane_save(control_plane=assign_fields(ControlPlane(), fields), actor=actor)


def control_plane_update(*, control_plane: ControlPlane, actor: Actor, **fields: Any) -> ControlPlane:
    return control_plane_save(control_plane=assign_fields(control_plane, fields), actor=actor)


def control_plane_delete(*, control_plane: ControlPlane, actor: Actor) -> None:
    with transaction.atomic():
        unschedule_control_plane(control_plane.pk)
        audited_delete(control_plane, actor=actor)
