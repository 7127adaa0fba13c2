"""The admin of the proxy's API keys: a new key's plaintext is shown once, when it is made."""

from __future__ import annotations

import datetime
import time
from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest
from django.utils.html import format_html

from . import services
from .admin_base import ServiceAdminMixin
from .admin_base import actor_of as _actor
from .live import budgets as live_budgets
from .live.connection import client as redis_client
from .models import ApiKey


def _against(used: int, budget: int | None) -> str:
    if budget is None:
        return f"{used:,} tokens (no budget)"
    return f"{used:,} of {budget:,} tokens ({min(999, used * 100 // budget)}%)"


@admin.register(ApiKey)
class ApiKeyAdmin(ServiceAdminMixin[ApiKey], admin.ModelAdmin):
    entity = "api_key"
    list_display = (
        "name",
        "prefix",
        "is_active",
        "allowed_models",
        "rate_limit_rpm",
        "tokens_per_minute",
        "tokens_per_day",
        "created_at",
        "last_used_at",
    )
    list_filter = ("is_active",)
    search_fields = ("name", "prefix")
    fields = ("name", "allowed_models", *ApiKey.LIMIT_FIELDS, "is_active")
    readonly_fields = ("token_use", "prefix", "created_by", "created_at", "last_used_at")

    @admin.display(description="Token use")
    def token_use(self, key: ApiKey) -> str:
        """The tokens the web workers counted for the key in this minute and this UTC day, against
        its budgets (up to one sync of the workers behind; docs/usage.md)."""
        use = live_budgets.key_use(redis_client(), key.pk, time.time()) if key.pk else None
        if use is None:
            return "unknown (Redis cannot be read)" if key.pk else "-"
        return format_html(
            "{} this minute (resets in {} s)<br>{} today (UTC, resets in {})",
            _against(use.minute, key.tokens_per_minute),
            use.minute_resets_in,
            _against(use.day, key.tokens_per_day),
            datetime.timedelta(seconds=use.day_resets_in),
        )

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
