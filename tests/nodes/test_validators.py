"""nodes.validators: the rules every interface applies to model names, names and stored values."""

from __future__ import annotations

import json

import pytest
from django.core.exceptions import ValidationError

from nodes.validators import (
    MAX_JSON_DEPTH,
    clean_model_name,
    clean_model_names,
    load_json,
    unstorable,
    validate_single_line,
)


@pytest.mark.parametrize("name", ["m", "Qwen/Qwen2.5-7B-Instruct", "my model", "模型-v2", "llama3:8b@q4"])
def test_it_accepts_model_names_people_use(name: str) -> None:
    assert clean_model_name(f"  {name} ") == name


@pytest.mark.parametrize(
    "name",
    ["", "   ", "a\x00b", "a\x1b[2Jb", "a\nb", "a\tb", "\ud800", "a\u202eb", "a\u200bb", "x" * 256, 5, None, ["m"]],
)
def test_it_refuses_model_names_no_interface_may_store(name: object) -> None:
    with pytest.raises(ValidationError):
        clean_model_name(name)


def test_a_list_of_model_names_names_its_bad_item_and_drops_repeats() -> None:
    assert clean_model_names(["a", " a", "b"]) == ["a", "b"]
    with pytest.raises(ValidationError, match="Item 1"):
        clean_model_names(["a", "b\x00"])
    with pytest.raises(ValidationError):
        clean_model_names("a")


def test_a_name_is_one_printable_line() -> None:
    validate_single_line("edge node 7 — rack b")
    with pytest.raises(ValidationError, match="U\\+000A"):
        validate_single_line("two\nlines")


def test_it_says_why_a_value_cannot_be_stored() -> None:
    deep: object = 1
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = {"a": deep}
    assert "NUL" in unstorable({"k": "a\x00"})
    assert "surrogate" in unstorable({"\udc00": 1})
    assert "not a number" in unstorable([float("nan")])
    assert "nested deeper" in unstorable(deep)
    assert unstorable({"k": ["fine", 1, 2.5, None, True]}) is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"speed": NaN}', "NaN"),
        (b'{"speed": -Infinity}', "Infinity"),
        (b'{"speed": 1e400}', "too large"),
        (b'{"n": ' + b"9" * 101 + b"}", "100 digits"),
        (b'{"models": ["\\ud800"]}', "surrogate"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
        (b'{"name": "\xff"}', "utf-8"),
    ],
)
def test_a_body_is_read_strictly(raw: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        load_json(raw)


def test_a_plain_body_reads_as_json_does() -> None:
    body = {"url": "http://10.0.0.5:8000", "status": {"models": ["m"], "speed": 1.5, "role": 1}, "x": "a\u0000"}
    assert load_json(json.dumps(body).encode()) == body
