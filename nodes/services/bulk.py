"""Inserting thousands of validated rows at once: the registry sync's new nodes, their aliases and
their audit records.

On SQLite, Django's ``bulk_create`` runs every value through its SQL compiler (the field's
preparation, a placeholder, an expression check, the statement assembled value by value) in
statements of 999 parameters: for a sync of 5,000 new nodes, 15,000 aliases and 20,000 audit records
that cost several times what SQLite itself took (``bench/registry_sync.py``). There ``bulk_insert``
stores the same values in the same columns: ``get_db_prep_save`` of the field where the value needs
converting for the database (JSON, dates and times, anything but the plain types below), the
attribute as it is otherwise, in multi-row ``INSERT`` statements of the same batch size, and reads
the new primary keys back with ``RETURNING``, as ``bulk_create`` does. The objects must have passed
validation (``clean_fields``): a plain field's value goes to the database as it is.

On PostgreSQL ``bulk_create`` already sends one array per column (``UNNEST``), which costs less than
thousands of parameters would: ``bulk_insert`` is ``bulk_create`` there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from django.db import connections, models, router
from django.db.models.fields import NOT_PROVIDED

M = TypeVar("M", bound=models.Model)

# Fields whose validated value is what the database driver takes (``get_db_prep_save`` hands it on
# unchanged); exact classes only, so a subclass that converts keeps its conversion.
_PLAIN = frozenset(
    {
        models.CharField,
        models.TextField,
        models.BooleanField,
        models.IntegerField,
        models.BigIntegerField,
        models.SmallIntegerField,
        models.PositiveIntegerField,
        models.PositiveSmallIntegerField,
        models.PositiveBigIntegerField,
        models.FloatField,
        models.ForeignKey,
    }
)


def bulk_insert(model: type[M], objs: Sequence[M]) -> list[M]:
    """Insert ``objs`` (new ``model`` instances, validated) and set their primary keys, as
    ``model.objects.bulk_create(objs)`` would, at a fraction of its cost per value."""
    if not objs:
        return list(objs)
    db = router.db_for_write(model)
    connection = connections[db]
    meta = model._meta
    fields = [f for f in meta.local_concrete_fields if f is not meta.pk and not f.generated]
    if (
        connection.vendor != "sqlite"
        or not connection.features.can_return_rows_from_bulk_insert
        or any(getattr(f, "db_default", NOT_PROVIDED) is not NOT_PROVIDED for f in fields)
        or any(obj.pk is not None for obj in objs)
    ):
        return model._default_manager.using(db).bulk_create(objs)
    stamped = [f for f in fields if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False)]
    getters: list[Callable[[M], Any]] = [_getter(field, connection) for field in fields]
    quote = connection.ops.quote_name
    returning, returning_params = connection.ops.return_insert_columns([meta.pk])
    head = f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) VALUES "
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    size = max(1, connection.ops.bulk_batch_size(fields, objs))
    with connection.cursor() as cursor:
        for start in range(0, len(objs), size):
            batch = objs[start : start + size]
            params: list[Any] = []
            for obj in batch:
                # As bulk_create does: a related object given by instance lends its key, or is refused unsaved.
                obj._prepare_related_fields_for_save(operation_name="bulk_create")  # type: ignore[attr-defined]
                for field in stamped:
                    field.pre_save(obj, add=True)
                params.extend([get(obj) for get in getters])
            cursor.execute(f"{head}{', '.join([row] * len(batch))} {returning}", (*params, *returning_params))
            keys = cursor.fetchall()
            for obj, (key,) in zip(batch, keys, strict=True):
                obj.pk = key
                obj._state.adding = False
                obj._state.db = db
    return list(objs)


def _getter(field: models.Field[Any, Any], connection: Any) -> Callable[[Any], Any]:
    attname = field.attname
    if type(field) in _PLAIN:
        return lambda obj: getattr(obj, attname)
    prepare = field.get_db_prep_save
    return lambda obj: prepare(getattr(obj, attname), connection)
