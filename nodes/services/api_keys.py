"""Writes to the proxy's API keys, and the copy of their last use from Redis into the database."""

from __future__ import annotations

import datetime
import logging
from typing import Any

import redis as redis_lib
from django.core.exceptions import ValidationError
from django.db import models, transaction

from ..live import keys as live_keys
from ..live.connection import client as redis_client
from ..models import ApiKey, generate_api_key
from .audit import Actor, assign_fields, audited_delete, audited_save
from .concurrency import copy_row, current_with

logger = logging.getLogger(__name__)


def api_key_create(*, actor: Actor, name: str, plaintext: str | None = None, **fields: Any) -> tuple[ApiKey, str]:
    """Create a proxy key. Returns the row and the plaintext key, which is never stored or shown again."""
    plaintext = plaintext or generate_api_key()
    api_key = assign_fields(ApiKey(name=name, created_by=actor.user), fields)
    api_key.set_plaintext(plaintext)
    if ApiKey.objects.filter(key_hash=api_key.key_hash).exists():
        raise ValidationError({"key": "This key is already registered."})
    audited_save(api_key, actor=actor)
    return api_key, plaintext


def api_key_save(*, api_key: ApiKey, actor: Actor) -> ApiKey:
    return audited_save(api_key, actor=actor)[0]


def api_key_update(*, api_key: ApiKey, actor: Actor, **fields: Any) -> ApiKey:
    """Change ``fields`` of the key as it is stored now (``nodes.services.concurrency``)."""
    with transaction.atomic():
        return copy_row(api_key, api_key_save(api_key=current_with(api_key, fields), actor=actor))


def api_key_delete(*, api_key: ApiKey, actor: Actor) -> None:
    audited_delete(api_key, actor=actor)


def api_key_record_usage() -> int:
    """Copy the proxy's record of when each key was last used (Redis) into ``ApiKey.last_used_at``.
    Bookkeeping, not a configuration change: no audit record, no version bump. Returns rows updated."""
    try:
        raw = redis_client().hgetall(live_keys.KEYS_LAST_USED)
    except redis_lib.RedisError as exc:
        logger.warning("could not read API key usage from Redis: %s", exc)
        return 0
    updated = 0
    for key_id, stamp in raw.items():
        try:
            when = datetime.datetime.fromtimestamp(float(stamp), tz=datetime.UTC)
            pk = int(key_id)
        except ValueError:
            continue
        updated += (
            ApiKey.objects.filter(pk=pk)
            .filter(models.Q(last_used_at__isnull=True) | models.Q(last_used_at__lt=when))
            .update(last_used_at=when)
        )
    return updated
