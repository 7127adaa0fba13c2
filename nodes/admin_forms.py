"""The admin's form fields: JSON that refuses what cannot be stored."""

from __future__ import annotations

from typing import Any

from django import forms

from .validators import unstorable


class StorableJSONField(forms.JSONField):
    """The admin's JSON fields: what cannot be stored (nodes.validators.unstorable), or is nested too
    deeply to parse, is a form error, not a 500."""

    def to_python(self, value: Any) -> Any:
        try:
            converted = super().to_python(value)
        except RecursionError:
            raise forms.ValidationError("This is nested too deeply.", code="invalid") from None
        reason = unstorable(converted)
        if reason is not None:
            raise forms.ValidationError(f"This cannot be stored: {reason}.", code="invalid")
        return converted
