"""The admin's shared pieces: the actor of an admin request, badges in their colours, and the mixin
that routes saves and deletes through ``nodes.services`` (see ``nodes.admin``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from django.db.models import Field, JSONField, Model, QuerySet
from django.forms import ModelForm
from django.http import HttpRequest
from django.utils.html import format_html

from . import services
from .admin_forms import RowVersionForm, StorableJSONField
from .choices import BadgeChoices, ChangeVia


def actor_of(request: HttpRequest) -> services.Actor:
    return services.Actor.for_user(request.user, ChangeVia.ADMIN)


def badge(choices: type[BadgeChoices], value: str, text: str | None = None) -> str:
    """``value`` in its colour, labelled with its choice label (or ``text``)."""
    label = text if text is not None else dict(choices.choices).get(value, value)
    return format_html('<span class="rp-badge" style="background:{}">{}</span>', choices.colour(value), label)


_M = TypeVar("_M", bound=Model)


class ServiceAdminMixin(Generic[_M]):
    """Routes the admin's saves and deletes through the model's services.

    ``entity`` names them: with ``entity = "node"`` a save calls
    ``services.node_save(node=obj, actor=...)`` and a delete ``services.node_delete(node=obj, actor=...)``.
    """

    entity: str
    formfield_overrides: Mapping[type[Field], Mapping[str, Any]] = {JSONField: {"form_class": StorableJSONField}}
    form: type[ModelForm[Any]] = RowVersionForm

    def get_fieldsets(self, request: HttpRequest, obj: _M | None = None) -> Any:
        """The change form's fieldsets, with the hidden row version (``RowVersionForm``) in the first."""
        fieldsets = super().get_fieldsets(request, obj)  # type: ignore[misc]
        if obj is None or any("row_version" in options.get("fields", ()) for _, options in fieldsets):
            return fieldsets
        (name, options), *rest = fieldsets
        return [(name, {**options, "fields": [*options.get("fields", ()), "row_version"]}), *rest]

    def save_model(self, request: HttpRequest, obj: _M, form: Any, change: bool) -> None:
        services.entity_service(self.entity, "save")(**{self.entity: obj}, actor=actor_of(request))

    def delete_model(self, request: HttpRequest, obj: _M) -> None:
        services.entity_service(self.entity, "delete")(**{self.entity: obj}, actor=actor_of(request))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[_M]) -> None:
        for obj in queryset:
            self.delete_model(request, obj)
