"""The proxy's API keys: only a key's hash is stored; the plaintext is shown once, when it is made."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from ..validators import clean_model_names, validate_single_line, validate_token_budget
from .base import RegistryModel

API_KEY_PREFIX = "rp-"


def hash_api_key(plaintext: str) -> str:
    """SHA-256 of a proxy key. Keys are 256-bit random strings, so a fast hash is enough and keeps
    the proxy's per-request check cheap."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def generate_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


class ApiKey(RegistryModel):
    """A proxy key for ``/v1``. Only its hash is stored; the plaintext is shown once at creation."""

    # What the proxy limits a key by (every interface edits them alike: the REST API, the admin).
    LIMIT_FIELDS = ("rate_limit_rpm", "max_concurrent", "tokens_per_minute", "tokens_per_day")

    name = models.CharField(max_length=100, validators=[validate_single_line])
    prefix = models.CharField(max_length=16, editable=False, help_text="First characters, to tell keys apart.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    allowed_models = models.JSONField(default=list, blank=True, help_text="Model names this key may use; empty = all.")
    rate_limit_rpm = models.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute; empty = none.")
    max_concurrent = models.PositiveIntegerField(
        null=True, blank=True, help_text="Concurrent requests; empty or 0 = no limit (as on nodes)."
    )
    # Token budgets (prompt + completion tokens, as the engines count them), enforced by the proxy
    # across every web worker: see docs/usage.md for the windows and how far a key may overshoot.
    tokens_per_minute = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[validate_token_budget],
        help_text="Token budget per minute (prompt + completion); empty = no budget.",
    )
    tokens_per_day = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[validate_token_budget],
        help_text="Token budget per UTC day (prompt + completion); empty = no budget.",
    )
    is_active = models.BooleanField(default=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name = "API key"
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def clean(self) -> None:
        super().clean()
        try:
            self.allowed_models = clean_model_names(self.allowed_models)
        except ValidationError as exc:
            raise ValidationError({"allowed_models": f"{' '.join(exc.messages)} (empty for all models)"}) from None

    def set_plaintext(self, plaintext: str) -> None:
        self.key_hash = hash_api_key(plaintext)
        self.prefix = plaintext[:10]
