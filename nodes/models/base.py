"""What the entities an operator edits share: no value that cannot be stored; and the health-check
settings of control planes and nodes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from ..validators import unstorable


class RegistryModel(models.Model):
    """The base of control planes, nodes, aliases, route policies and API keys: ``clean`` refuses,
    in any field, a value no database can hold (``nodes.validators.unstorable``): a lone surrogate,
    a NUL character, a number that is not finite, JSON nested too deep.
    """

    class Meta:
        abstract = True

    def clean(self) -> None:
        super().clean()
        self.check_storable(self._meta.concrete_fields)

    def check_storable(self, fields: Iterable[models.Field[Any, Any]]) -> None:
        """``ValidationError`` naming each of ``fields`` whose value cannot be stored."""
        errors: dict[str, str] = {}
        for field in fields:
            reason = unstorable(getattr(self, field.attname))
            if reason is not None:
                errors[field.name] = f"This cannot be stored: {reason}."
        if errors:
            raise ValidationError(errors)


class HealthCheckSettings(RegistryModel):
    """The active health check's settings a control plane or a node may set for itself. Empty fields
    inherit: a node's from its control plane, then from ``ROUTERPANEL_HEALTH_*`` (resolved by
    ``nodes.prober.targets.probe_settings``; the prober re-reads them when the configuration changes)."""

    health_interval = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.2), MaxValueValidator(3600)],
        help_text="Seconds between health probes of a node; empty = inherited (ROUTERPANEL_HEALTH_INTERVAL).",
    )
    health_timeout = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.05), MaxValueValidator(60)],
        help_text="Seconds a health probe may take; empty = inherited (ROUTERPANEL_HEALTH_TIMEOUT).",
    )
    health_failures = models.PositiveSmallIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(100)],
        help_text="Failed probes in a row that make a node unhealthy; empty = inherited (ROUTERPANEL_HEALTH_FAILURES).",
    )
    health_successes = models.PositiveSmallIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(100)],
        help_text="Good probes in a row that make it healthy again; empty = inherited (ROUTERPANEL_HEALTH_SUCCESSES).",
    )

    class Meta:
        abstract = True
