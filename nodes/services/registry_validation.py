"""The field values a registry diff has validated (``nodes.services.registry_diff``)."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import models

from ..models import ModelAlias, Node


class Validated:
    """The field values a diff has validated. A fleet's entities share most of theirs (the control
    plane's engine type and scope, the role, the kind, a model's aliases), and every check a field
    runs (``clean_fields``, ``RegistryModel.check_storable``) depends on its value alone, so each
    distinct value is validated once per diff, not once per entity: at 5,000 entities that was a
    third of a sync's time."""

    def __init__(self) -> None:
        self._fields: set[tuple[str, str, type, Any]] = set()
        self._aliases: set[tuple[str, str, str]] = set()

    def node(self, node: Node) -> None:
        """What ``Node.full_clean`` checks, without a query: the URL's uniqueness is decided in
        memory (the diff's ``_Rows.by_url``) and the control plane is the one being synced."""
        fresh: list[tuple[models.Field[Any, Any], tuple[str, str, type, Any] | None]] = []
        skip = ["control_plane"]
        for model_field in node._meta.concrete_fields:
            value = getattr(node, model_field.attname)
            key = (model_field.name, model_field.attname, type(value), value)
            try:
                known = key in self._fields
            except TypeError:  # a JSON document: checked every time
                fresh.append((model_field, None))
                continue
            if known and model_field.name != "control_plane":
                skip.append(model_field.name)
            else:
                fresh.append((model_field, key))
        node.clean_fields(exclude=skip)
        node.check_storable(model_field for model_field, _ in fresh)
        if not isinstance(node.metadata, dict):
            raise ValidationError({"metadata": "Metadata must be a JSON object."})
        for model_field, seen in fresh:  # remembered only if cleaning (which converts) left it as it was
            cleaned = None if seen is None else getattr(node, model_field.attname)
            if seen is not None and type(cleaned) is seen[2] and cleaned == seen[3]:
                self._fields.add(seen)

    def alias(self, *, name: str, served_name: str, origin: str) -> None:
        """What ``ModelAlias.full_clean`` checks of an alias's own values (its node's other aliases
        are checked by ``_alias_plan``)."""
        if (name, served_name, origin) in self._aliases:
            return
        alias = ModelAlias(name=name, served_name=served_name, origin=origin)
        alias.clean_fields(exclude=["node"])
        alias.clean()
        self._aliases.add((name, served_name, origin))
