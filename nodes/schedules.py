"""Keeps django-celery-beat's periodic tasks in step with the control planes: one interval task per
control plane, so the schedule is visible (and editable) in the admin. ``expire_seconds`` sits just
under the interval, so a backlog never piles up runs."""

from __future__ import annotations

import json

from django_celery_beat.models import IntervalSchedule, PeriodicTask

from .models import ControlPlane

TASK = "nodes.sync_control_plane"


def periodic_task_name(control_plane: ControlPlane) -> str:
    return f"registry sync: {control_plane.name} (#{control_plane.pk})"


def schedule_control_plane(control_plane: ControlPlane) -> PeriodicTask | None:
    """Create or update the control plane's periodic sync; a direct-registration control plane has
    no registry to sync, so it has none."""
    if control_plane.is_direct:
        unschedule_control_plane(control_plane.pk)
        return None
    interval, _ = IntervalSchedule.objects.get_or_create(
        every=control_plane.sync_interval, period=IntervalSchedule.SECONDS
    )
    expire = max(1, int(control_plane.sync_interval * 0.9))
    kwargs = _kwargs(control_plane.pk)
    task = PeriodicTask.objects.filter(task=TASK, kwargs=kwargs).first() or PeriodicTask(task=TASK, kwargs=kwargs)
    task.name = periodic_task_name(control_plane)
    task.interval = interval
    task.enabled = control_plane.enabled
    task.expire_seconds = expire
    task.description = f"Mirror NanoCtrl {control_plane.address} scope {control_plane.scope or '(none)'} into the nodes"
    task.save()
    return task


def unschedule_control_plane(control_plane_id: int) -> None:
    PeriodicTask.objects.filter(task=TASK, kwargs=_kwargs(control_plane_id)).delete()


def _kwargs(control_plane_id: int) -> str:
    return json.dumps({"control_plane_id": control_plane_id})
