"""Body validation the way the engines' pydantic models do it (pydantic v2, lax mode), for the flavours
whose engines validate strictly (LMDeploy's DistServe models, SGLang's bootstrap fields).

A model is a dict of field name to ``Field``; a type is ``"int"``, ``"str"``, ``"bool"``, ``Enum(...)``,
``ListOf(t)``, ``Optional(t)``, ``Union(...)`` or a nested model. Coercion follows pydantic's lax rules
for Python input: an int also accepts a bool, an integral float and a numeric string; a str accepts
only a str; a plain ``enum.Enum`` accepts only its values (``2``, not ``"RDMA"`` nor ``"2"``).
``tests/realengines/test_lmdeploy_models.py`` checks these verdicts against LMDeploy's own models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


class Invalid(Exception):
    """The first validation error: where (``loc``, without ``body``) and pydantic's message."""

    def __init__(self, loc: tuple[str | int, ...], message: str, kind: str, value: Any) -> None:
        super().__init__(f"{'.'.join(str(p) for p in loc)}: {message}" if loc else message)
        self.loc = loc
        self.message = message
        self.kind = kind
        self.value = value


@dataclass(frozen=True)
class Field:
    type: Any
    required: bool = True
    default: Any = None


@dataclass(frozen=True)
class Enum:
    values: tuple[int, ...]


@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class Optional:
    inner: Any


@dataclass(frozen=True)
class Union:
    options: tuple[Any, ...]


Model = dict[str, Field]


def validate(model: Model, data: Any, loc: tuple[str | int, ...] = ()) -> dict[str, Any]:
    """``data`` coerced to ``model``; ``Invalid`` at the first error (unknown keys are ignored)."""
    if not isinstance(data, dict):
        raise Invalid(loc, "Input should be a valid dictionary or object to extract fields from", "model_type", data)
    out: dict[str, Any] = {}
    for name, field in model.items():
        if name not in data:
            if field.required:
                raise Invalid((*loc, name), "Field required", "missing", data)
            out[name] = field.default
            continue
        out[name] = coerce(field.type, data[name], (*loc, name))
    return out


def coerce(kind: Any, value: Any, loc: tuple[str | int, ...]) -> Any:
    if isinstance(kind, dict):
        return validate(kind, value, loc)
    if isinstance(kind, Optional):
        return None if value is None else coerce(kind.inner, value, loc)
    if isinstance(kind, Union):
        first: Invalid | None = None
        for option in kind.options:
            try:
                return coerce(option, value, loc)
            except Invalid as exc:
                first = first or exc
        assert first is not None
        raise first
    if isinstance(kind, ListOf):
        if not isinstance(value, list | tuple):
            raise Invalid(loc, "Input should be a valid list", "list_type", value)
        return [coerce(kind.item, item, (*loc, i)) for i, item in enumerate(value)]
    if isinstance(kind, Enum):
        if isinstance(value, int | float) and not isinstance(value, bool) and value in kind.values:
            return int(value)
        names = ", ".join(str(v) for v in kind.values[:-1]) + f" or {kind.values[-1]}"
        raise Invalid(loc, f"Input should be {names}", "enum", value)
    if kind == "int":
        return _int(value, loc)
    if kind == "str":
        if isinstance(value, str):
            return value
        raise Invalid(loc, "Input should be a valid string", "string_type", value)
    if kind == "bool":
        return _bool(value, loc)
    raise TypeError(f"unknown schema type {kind!r}")


def _int(value: Any, loc: tuple[str | int, ...]) -> int:
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        message = "Input should be a valid integer, got a number with a fractional part"
        raise Invalid(loc, message, "int_from_float", value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        message = "Input should be a valid integer, unable to parse string as an integer"
        raise Invalid(loc, message, "int_parsing", value)
    raise Invalid(loc, "Input should be a valid integer", "int_type", value)


def _bool(value: Any, loc: tuple[str | int, ...]) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise Invalid(loc, "Input should be a valid boolean", "bool_type", value)
