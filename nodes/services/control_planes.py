"""Control planes: create, change and delete them (a save keeps the periodic sync task,
django-celery-beat, in step), and issue or revoke their registration tokens (``nodes.admission``)."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from .. import admission
from ..models import ControlPlane
from ..schedules import schedule_control_plane, unschedule_control_plane
from .audit import Actor, assign_fields, audited_delete, audited_save
from .concurrency import copy_row, current_with


def control_plane_save(*, control_plane: ControlPlane, actor: Actor) -> ControlPlane:
    """Save a control plane and keep its periodic sync task (django-celery-beat) in step.

    A new direct-registration control plane gets its registration token at once (engines have no
    other way in); its plaintext is left on ``control_plane.issued_token`` for the caller to show,
    once. It is not stored.
    """
    creating = control_plane._state.adding
    with transaction.atomic():
        audited_save(control_plane, actor=actor)
        schedule_control_plane(control_plane)
        if creating and control_plane.is_direct and not control_plane.registration_token_hash:
            control_plane.issued_token = control_plane_issue_token(control_plane=control_plane, actor=actor)
    return control_plane


def control_plane_create(*, actor: Actor, **fields: Any) -> ControlPlane:
    return control_plane_save(control_plane=assign_fields(ControlPlane(), fields), actor=actor)


def control_plane_update(*, control_plane: ControlPlane, actor: Actor, **fields: Any) -> ControlPlane:
    """Change ``fields`` of the control plane as it is stored now (``nodes.services.concurrency``)."""
    with transaction.atomic():
        saved = control_plane_save(control_plane=current_with(control_plane, fields), actor=actor)
    return copy_row(control_plane, saved)


def control_plane_delete(*, control_plane: ControlPlane, actor: Actor) -> None:
    with transaction.atomic():
        unschedule_control_plane(control_plane.pk)
        audited_delete(control_plane, actor=actor)


def control_plane_issue_token(*, control_plane: ControlPlane, actor: Actor) -> str:
    """Give the control plane a new registration token (replacing any previous one, which stops
    working at once) and return its plaintext: only its hash is stored, so this is the one time it
    can be shown. Engines already registered keep their nodes."""
    token = admission.generate_registration_token()
    control_plane.registration_token_hash = admission.hash_registration_token(token)
    control_plane.registration_token_prefix = token[: len(admission.REGISTRATION_TOKEN_PREFIX) + 8]
    audited_save(control_plane, actor=actor, note="registration token issued", affects_routing=False)
    return token


def control_plane_revoke_token(*, control_plane: ControlPlane, actor: Actor) -> ControlPlane:
    """Close the registration URL: the token stops working; registered nodes stay."""
    control_plane.registration_token_hash = ""
    control_plane.registration_token_prefix = ""
    audited_save(control_plane, actor=actor, note="registration token revoked", affects_routing=False)
    return control_plane
