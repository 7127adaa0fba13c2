"""The admin's forms and form fields: change forms that refuse a stale write, JSON that refuses what
cannot be stored."""

from __future__ import annotations

from typing import Any

from django import forms
from django.http import QueryDict

from . import services
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


class RowVersionForm(forms.ModelForm):
    """The admin's change forms: refuse to overwrite a row someone changed since the form was opened.

    The form carries the row's version (``services.row_version``) from when it was opened in a
    hidden field; on save it is compared with the row as it is now, read under its lock (the admin
    runs each change form's POST in one transaction, so nothing slips in between the check and the
    save). A mismatch is a form error, and the hidden field then carries the current version: the
    operator reloads to see the other change, or saves again to overwrite it knowingly.
    """

    row_version = forms.CharField(widget=forms.HiddenInput, required=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None:
            self.fields["row_version"].initial = services.row_version(self.instance)

    def clean(self) -> dict[str, Any]:
        super().clean()
        sent = self.cleaned_data.pop("row_version", None)  # not a field of the row
        if self.instance.pk is None:
            return self.cleaned_data
        current = services.row_version(services.locked_row(self.instance))
        if sent != current:
            if isinstance(self.data, QueryDict):  # the form shown again carries the current version
                data = self.data.copy()
                data[self.add_prefix("row_version")] = current
                self.data = data
            raise forms.ValidationError(
                f"Someone changed this {self.instance._meta.verbose_name} since you opened this page. "
                "Reload it to see their change; saving again overwrites it.",
                code="stale",
            )
        return self.cleaned_data
