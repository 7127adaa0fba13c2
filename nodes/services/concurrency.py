"""Concurrent writers: updates against the current row, and row versions for optimistic locking.

Two operators (or two automation scripts) that change one row at the same time must not undo each
other. An update therefore reads the row it changes again inside its transaction, locked
(``select_for_update``; on SQLite, where that is a no-op, the ``IMMEDIATE`` transactions set in
``routerpanel/settings.py`` serialise writers instead), assigns only the fields it was given and
saves: a partial update never writes back a stale copy of the fields it did not send, and the audit
record's "before" is the row as it was, not as the caller last saw it.

A full update (a REST ``PUT``, the admin's change form) sends every field, so it can still undo a
change made since the client read the row. ``row_version`` names the state of a row's writable
fields; the REST API sends it as the ``ETag`` and honours ``If-Match`` (412 on a stale write), the
admin carries it in a hidden field of the change form. Both compare it under the row's lock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TypeVar

from django.db import models
from django.utils.crypto import salted_hmac

from ..models import ModelAlias, Node
from .audit import assign_fields, field_values

M = TypeVar("M", bound=models.Model)

# Bookkeeping that background work changes on its own (health probes, syncs, key usage). Clients
# cannot write it and a partial update never overwrites it, so it is not part of a row's version:
# a busy key or a probed node would otherwise never keep an ETag long enough to use it.
_BOOKKEEPING = {"last_used_at", "last_seen_at", "last_checked_at", "health"}


class StaleWrite(Exception):
    """The row changed since the writer read it (its version no longer matches)."""

    def __init__(self, obj: models.Model, current: str) -> None:
        self.current = current
        name = obj._meta.verbose_name
        super().__init__(
            f"This {name} was changed by someone else since you read it (it is now version {current}). "
            "Read it again, apply your change to what is there now, and send that."
        )


def row_version(obj: models.Model) -> str:
    """A short digest of ``obj``'s writable state (its audited fields, less bookkeeping, and for a
    node its aliases). Keyed with the secret key, so that it reveals nothing about fields a reader
    does not see (a control plane's Redis password)."""
    read_only = set(getattr(obj, "READ_ONLY_FIELDS", ())) | _BOOKKEEPING
    state: dict[str, Any] = {k: v for k, v in field_values(obj).items() if k not in read_only}
    if isinstance(obj, Node) and obj.pk is not None:
        state["aliases"] = sorted(
            ModelAlias.objects.filter(node_id=obj.pk).values_list("name", "served_name", "origin")
        )
    payload = json.dumps(state, sort_keys=True, default=str)
    return salted_hmac("nodes.row_version", payload, algorithm="sha256").hexdigest()[:20]


def matches(version: str, wanted: Iterable[str]) -> bool:
    """Whether ``version`` is one of ``wanted`` (versions or ``*``, as ``If-Match`` lists them)."""
    return any(item == "*" or item == version for item in wanted)


def locked_row(obj: M) -> M:
    """The stored row of ``obj``, locked until the current transaction ends (call inside one)."""
    return type(obj)._default_manager.select_for_update().get(pk=obj.pk)


def check_version(current: models.Model, expected: Iterable[str]) -> None:
    """``StaleWrite`` unless ``current`` (read under its lock) is at one of the ``expected`` versions
    (as ``If-Match`` lists them: versions or ``*``)."""
    version = row_version(current)
    if not matches(version, expected):
        raise StaleWrite(current, version)


def current_with(obj: M, fields: dict[str, Any]) -> M:
    """The stored row of ``obj``, locked, with ``fields`` assigned: what a partial update saves.
    Call inside a transaction."""
    return assign_fields(locked_row(obj), fields)


def copy_row(target: M, source: M) -> M:
    """Give the caller's ``target`` the saved values of ``source`` (the same row), so that code
    holding the old instance sees what was stored."""
    for field in source._meta.concrete_fields:
        setattr(target, field.attname, getattr(source, field.attname))
    if hasattr(target, "_prefetched_objects_cache"):
        target._prefetched_objects_cache = {}
    return target
