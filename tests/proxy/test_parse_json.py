"""``proxy.request.parse_json`` reads every body as ``json.loads`` does: the same values, the
same types, the same errors; ``proxy.request.json_bytes`` writes every value as the standard
library does, read back (it is orjson where that gives the same answer)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.request import json_bytes, parse_json


def same(data: bytes) -> None:
    """``parse_json(data)`` and ``json.loads(data)`` agree: value and type, all the way down (a
    big integer read as a float compares equal to neither, since the types are compared too), or
    both raise the same exception type."""
    try:
        expected: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        with pytest.raises(type(exc)):
            parse_json(data)
        return
    assert _typed(parse_json(data)) == _typed(expected)


def _typed(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_typed(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    return (type(value).__name__, value)


@pytest.mark.parametrize(
    "data",
    [
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":16,"temperature":0.7}',
        # Integers beyond 64 bits: orjson would make them floats.
        b'{"seed":123456789012345678901234567890}',
        b'{"seed":-9223372036854775809}',
        b'{"seed":18446744073709551616}',
        b'{"n":[1e400,-1e400,5e-324,1.7976931348623157e308,-0.0,0.1]}',
        # What the standard library accepts and orjson refuses.
        b'{"temperature":NaN,"top_p":Infinity,"x":-Infinity}',
        b'{"content":"\\ud800 alone"}',
        b'"\xed\xa0\x80"',
        b'\xef\xbb\xbf{"model":"m"}',
        '{"model":"é"}'.encode("utf-16"),
        '{"model":"é"}'.encode("utf-32"),
        # Errors: not JSON, bad UTF-8, trailing data, nested too deeply for either parser.
        b"",
        b"{",
        b'{"a":1} x',
        b'{"a":01}',
        b'{"a":"x\x01"}',
        b'"\xff"',
        b"[" * 100_000 + b"]" * 100_000,
        # Duplicate keys (the last wins), escapes, a body that is not an object.
        b'{"a":1,"a":2,"\\u0000":"\\/\\n\\u00e9\\ud83d\\ude00"}',
        b"[1,2,3]",
        b" \n\t42\r\n",
    ],
)
def test_reads_what_the_standard_library_reads(data: bytes) -> None:
    same(data)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(JSON_VALUES, st.booleans())
def test_any_encoded_value_reads_back_as_the_standard_library_reads_it(value: Any, ascii_only: bool) -> None:
    same(json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))


def written_alike(value: Any) -> None:
    """``json_bytes(value)`` reads back as the standard library's compact encoding of it does:
    value and type, NaN and infinities included (which orjson alone would write as ``null``)."""
    expected = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    written = json_bytes(value)
    assert _typed(json.loads(written)) == _typed(json.loads(expected))


class Count(int):
    """An int subclass whose text is not its value's (the standard library writes ``int.__repr__``)."""

    def __repr__(self) -> str:
        return "Count()"


@pytest.mark.parametrize(
    "value",
    [
        {"stream": False, "kv_transfer_params": {"migration": "QUJD" * 150, "seq_id": 12, "first_token": 5}},
        {"temperature": math.nan, "top_p": math.inf, "x": [-math.inf, 0.5]},
        {"seed": 123456789012345678901234567890, "n": -(2**64)},
        {"content": "\ud800 alone", "ok": "\u00e9\u2028\x01"},
        {1: "a key that is no string", None: 2},
        {"n": [1e-05, 1e16, 5e-324, 1.7976931348623157e308, -0.0]},
        {"count": Count(3), "flag": True},
        ("a", "tuple"),
    ],
)
def test_writes_what_the_standard_library_writes(value: Any) -> None:
    written_alike(value)


@given(JSON_VALUES | st.floats() | st.lists(st.floats()))
def test_any_value_is_written_as_the_standard_library_writes_it(value: Any) -> None:
    written_alike(value)
