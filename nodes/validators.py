"""What the registry accepts, defined once: model names, single-line names, JSON documents, and
the strings inside anything it stores. Node URLs have theirs in ``nodes.networks``.

Every interface reaches these rules: the models' field validators (so the admin's forms and the
services' ``full_clean``), the REST serializers (their fields come from the models, and the list
fields name these validators), DLRouter's ``/nodes/add`` and the registration URL
(``nodes.compat``), and the registry sync, whose entities go through the same services. The
checks are iterative: a hostile document nested a hundred thousand levels deep costs a loop, not
the interpreter's stack.
"""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Any

from django.core.exceptions import ValidationError

from .choices import Endpoint

MAX_NAME_LENGTH = 255
# Deeper than any configuration an operator writes; deep enough documents break serialisers and
# renderers that recurse (json, the admin's widgets), and the database's JSON functions.
MAX_JSON_DEPTH = 32
# A request body may wrap a stored document in a few levels of its own.
MAX_BODY_DEPTH = MAX_JSON_DEPTH + 8
# Models one node may serve: each becomes an alias (and a path and a basename alias with it).
MAX_MODELS_PER_NODE = 256

# Unicode categories no name may hold: they are invisible, move the cursor or the line (a log or a
# metrics label with them in it lies to its reader), or, for surrogates, cannot be encoded at all.
_REFUSED = {
    "Cc": "a control character",
    "Cf": "an invisible formatting character",
    "Cs": "a lone surrogate",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}


def _code_point(char: str) -> str:
    return f"U+{ord(char):04X}"


def refused_character(value: str) -> str | None:
    """Why ``value`` may not be a name (its first refused character), or ``None``."""
    for position, char in enumerate(value):
        category = unicodedata.category(char)
        if category in _REFUSED:
            return f"it holds {_REFUSED[category]} ({_code_point(char)}) at position {position}"
    return None


def validate_single_line(value: str) -> None:
    """A name shown to people and written to logs: printable text on one line."""
    reason = refused_character(value)
    if reason is not None:
        raise ValidationError(f"Use printable text on one line: {reason}.", code="invalid_characters")


def validate_model_name(value: str) -> None:
    """A model name (what clients send in ``model``, what a node serves): one printable line of at
    most 255 characters, without leading or trailing spaces."""
    if not value or not value.strip():
        raise ValidationError("A model name cannot be blank.", code="blank")
    if len(value) > MAX_NAME_LENGTH:
        raise ValidationError(f"A model name has at most {MAX_NAME_LENGTH} characters.", code="max_length")
    if value != value.strip():
        raise ValidationError("A model name cannot start or end with a space.", code="invalid")
    reason = refused_character(value)
    if reason is not None:
        raise ValidationError(f"This is not a usable model name: {reason}.", code="invalid_characters")


def clean_model_name(value: object) -> str:
    """``value`` as a model name (trimmed), for the interfaces that read raw JSON; ``ValidationError``
    when it is not a string or not a usable name."""
    if not isinstance(value, str):
        raise ValidationError("A model name is a string.", code="invalid")
    name = value.strip()
    validate_model_name(name)
    return name


def clean_model_names(values: object) -> list[str]:
    """A list of model names, trimmed, without repeats; ``ValidationError`` naming the first bad one."""
    if not isinstance(values, list):
        raise ValidationError("Give a list of model names.", code="invalid")
    if len(values) > MAX_MODELS_PER_NODE:
        raise ValidationError(f"Give at most {MAX_MODELS_PER_NODE} model names.", code="max_length")
    names: list[str] = []
    for index, value in enumerate(values):
        try:
            name = clean_model_name(value)
        except ValidationError as exc:
            raise ValidationError(f"Item {index}: {' '.join(exc.messages)}", code=exc.code) from None
        if name not in names:
            names.append(name)
    return names


def unstorable(value: Any) -> str | None:
    """Why ``value`` — a string, a number or a JSON document — cannot be stored as it is, or ``None``:
    a lone surrogate (no encoding holds one), a NUL byte (PostgreSQL refuses it in text and JSON),
    a number that is not finite (JSON has none), or nesting deeper than ``MAX_JSON_DEPTH``."""
    return _problem(value, max_depth=MAX_JSON_DEPTH, nul=True)


def _problem(value: Any, *, max_depth: int, nul: bool) -> str | None:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                return f"it is nested deeper than {max_depth} levels"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, str):
            if nul and "\x00" in item:
                return "it holds a NUL character (U+0000)"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"it holds a lone surrogate ({_code_point(item[exc.start])})"
        elif isinstance(item, float) and not math.isfinite(item):
            return f"{item} is not a number JSON can hold"
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:40]} is too large for a number")
    return number


def _bounded_int(text: str) -> int:
    if len(text) > 100:
        raise ValueError("a number has more than 100 digits")
    return int(text)


def load_json(raw: bytes | str) -> Any:
    """A request body's JSON, read strictly, or ``ValueError`` saying what is wrong with it: UTF-8,
    no ``NaN`` or ``Infinity`` (nor a number too large to be finite), no lone surrogate in any
    string (``"\\ud800"`` is valid JSON that no encoding can hold), at most ``MAX_BODY_DEPTH`` levels.
    The REST API's parser and DLRouter's endpoints read bodies with it."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise ValueError(f"it is nested deeper than {MAX_BODY_DEPTH} levels") from None
    reason = _problem(value, max_depth=MAX_BODY_DEPTH, nul=False)
    if reason is not None:
        raise ValueError(reason)
    return value


def validate_storable(value: Any) -> None:
    """``unstorable`` as a field validator (JSON fields)."""
    reason = unstorable(value)
    if reason is not None:
        raise ValidationError(f"This cannot be stored: {reason}.", code="unstorable")


def validate_endpoints(value: object) -> None:
    """``Node.endpoints``: a list of ``Endpoint`` values (empty: the engine type's default)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationError("Endpoints must be a list of names.")
    unknown = sorted(set(value) - set(Endpoint.values))
    if unknown:
        raise ValidationError(f"Unknown endpoint(s) {', '.join(unknown)}; choose from {', '.join(Endpoint.values)}.")


def validate_token_budget(value: int | None) -> None:
    """An API key's token budget (per minute, per day): empty for none, else at least one token. A
    budget of 0 would refuse every request; an operator who wants that deactivates the key."""
    if value is not None and value < 1:
        raise ValidationError("A token budget is at least 1; leave it empty for no budget.", code="min_value")
