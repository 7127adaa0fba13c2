"""What the entities an operator edits share: no value that cannot be stored."""

from __future__ import annotations

from django.core.exceptions import ValidationError
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
        errors: dict[str, str] = {}
        for field in self._meta.concrete_fields:
            reason = unstorable(getattr(self, field.attname))
            if reason is not None:
                errors[field.name] = f"This cannot be stored: {reason}."
        if errors:
            raise ValidationError(errors)
