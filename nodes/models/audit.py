"""The audit trail and the configuration version every routing change bumps (``nodes.services.audit``)."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from ..choices import ChangeAction, ChangeVia


class ConfigVersion(models.Model):
    """A single row whose ``version`` grows by one on every routing change (see services)."""

    version = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "configuration version"

    def __str__(self) -> str:
        return f"configuration v{self.version}"


class ChangeRecord(models.Model):
    """One audited change: who or what made it, through which interface, and what changed."""

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_label = models.CharField(max_length=200, help_text="User name, or the process that made the change.")
    via = models.CharField(max_length=10, choices=ChangeVia.choices)
    action = models.CharField(max_length=10, choices=ChangeAction.choices)
    object_type = models.CharField(max_length=50, db_index=True)
    object_id = models.CharField(max_length=50, db_index=True)
    object_repr = models.CharField(max_length=500)
    changes = models.JSONField(default=dict, blank=True, help_text="{field: [old, new]}")
    note = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.actor_label} {self.action} {self.object_type} {self.object_repr}"
