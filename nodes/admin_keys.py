"""The admin of the proxy's API keys: a new key's plaintext is shown once, when it is made."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest
from django.utils.html import format_html

from . import services
from .admin_base import ServiceAdminMixin
from .admin_base import actor_of as _actor
from .models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(ServiceAdminMixin[ApiKey], admin.ModelAdmin):
    entity = "api_key"
    list_display = ("name", "prefix", "is_active", "allowed_models", "rate_limit_rpm", "created_at", "last_used_at")
    list_filter = ("is_active",)
    search_fields = ("name", "prefix")
    fields = ("name", "allowed_models", "rate_limit_rpm", "max_concurrent", "is_active")
    readonly_fields = ("prefix", "created_by", "created_at", "last_used_at")

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        return self.fields if obj is None else (*self.fields, *self.readonly_fields)

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        # A new key is made by the service (its plaintext, its hash, the duplicate check); the admin
        # then logs and redirects to the object it passed in, so that becomes the stored row.
        created, plaintext = services.api_key_create(actor=_actor(request), **form.cleaned_data)
        obj.pk = created.pk
        obj.refresh_from_db()
        messages.warning(
            request,
            format_html(
                "Copy the key for “{}” now — it is not stored and will not be shown again: <code>{}</code>",
                obj.name,
                plaintext,
            ),
        )
