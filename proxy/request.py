"""A parsed client request (``ProxyRequest``) and what became of it (``Outcome``), shared by the
hybrid path and the PD legs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import c_make_encoder, encode_basestring, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

import orjson

from .explain import HEADER, Explanation
from .snapshot import Route
from .transport import RequestHeaders


def _compact(*, ensure_ascii: bool) -> Callable[[Any], str]:
    """A compact JSON encoder made once. ``json.dumps`` with non-default options builds a new
    ``JSONEncoder`` and C encoder on every call, half the cost of encoding a small body; this keeps
    the C encoder (``check_circular`` off: what is encoded here came from ``parse_json`` or is ours)."""
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, separators=(",", ":"), check_circular=False)
    if c_make_encoder is None:  # no C accelerator (another Python): the plain encoder
        return encoder.encode
    strings = encode_basestring_ascii if ensure_ascii else encode_basestring
    make = c_make_encoder(None, encoder.default, strings, None, ":", ",", False, False, True)
    return lambda obj: "".join(make(obj, 0))


_encode = _compact(ensure_ascii=False)
_encode_ascii = _compact(ensure_ascii=True)

# What ``parse_json`` (as ``json.loads``) raises for bytes that are not JSON it can read: not JSON,
# not text, or nested deeper than the parser's stack.
JSON_ERRORS = (ValueError, UnicodeDecodeError, RecursionError)

# Every byte to "0" if it is a digit, else to " ": a run of 19 digits is then one substring search.
_DIGITS_ONLY = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_LONG_RUN = b"0" * 19


def parse_json(data: bytes) -> Any:
    """``json.loads(data)``: the same value, and the same error, for every input; four to five times
    faster on the bodies the data path reads, through orjson.

    orjson accepts only strict JSON in UTF-8, and what it accepts it reads as the standard library
    does but for one thing: an integer beyond 64 bits becomes a float. So a body with 19 digits in a
    row anywhere (an integer that may be that large, or a string of digits) goes to the standard
    library, and so does everything orjson refuses: the standard library then accepts what it
    always accepted (``NaN``, lone surrogate escapes, a byte order mark, UTF-16) and raises the
    errors it always raised (``RecursionError`` for deep nesting among them)."""
    if data.translate(_DIGITS_ONLY).find(_LONG_RUN) < 0:  # not ``in``: see ``_head`` in routerpanel.proxylane
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


def _plain(value: Any) -> bool:
    """Whether orjson writes ``value`` as the standard library does, up to spacing and number
    spelling (``1e-05`` / ``1e-5``): JSON's own types only, exactly (no subclass, whose encoding the
    standard library takes from ``int.__repr__`` and orjson may not), and no NaN or infinity, which
    orjson writes as ``null``. Integers beyond 64 bits, lone surrogates and keys that are not
    strings are not checked here: orjson refuses them, and ``json_bytes`` falls back."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is dict:
        value = value.values()
    elif kind is not list:
        return kind is float and value - value == 0.0  # finite (inf - inf and nan - nan are nan)
    for item in value:  # plain loops: cheaper than generators here
        kind = type(item)
        # A string, an integer or null inline: most members are one, and a call costs more than the test.
        if kind is not str and kind is not int and item is not None and not _plain(item):
            return False
    return True


# orjson refuses what the standard library writes otherwise or refuses itself: a subclass of a JSON
# type, a dataclass, a date or time (orjson alone writes all of these its own way).
_ORJSON_REFUSES = orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def json_bytes(obj: Any) -> bytes:
    """``obj`` (JSON's values, as ``parse_json`` gives them or the data path builds them) as compact
    JSON in UTF-8: the one encoder for everything sent on from a client's JSON (a rewritten
    ``model``, the PD legs' bodies, a PD answer's merged usage).

    orjson writes it when it would say the same as the standard library, three to ten times
    faster; otherwise, and whenever orjson refuses it, the standard library does. orjson refuses a
    subclass here (``_ORJSON_REFUSES``), and it writes NaN and infinities as ``null``: only when its
    answer holds a ``null`` is the value walked (``_plain``), so a body without one costs no walk.
    A string the client sent as a lone surrogate escape (``"\\ud800"``) decodes to a code point
    UTF-8 cannot encode; it is then sent escaped, as the client sent it, so the engine decides on
    it on every path as it does when the client's bytes pass unchanged (never a 500 of ours). The
    common case pays for nothing: the fallback runs only when the UTF-8 encoding fails."""
    try:
        data = orjson.dumps(obj, option=_ORJSON_REFUSES)
    except orjson.JSONEncodeError:  # beyond 64 bits, a lone surrogate, a key that is no string, a subclass
        pass
    else:
        # ``find``, not ``in``: see ``_head`` in routerpanel.proxylane.
        if data.find(b"null") < 0 or _plain(obj):
            return data
    text = _encode(obj)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _encode_ascii(obj).encode()


def with_members(body: bytes, members: bytes) -> bytes:
    """``body`` (a JSON object with at least one member, the client's or built from it) with
    ``members`` (encoded ``"key":value`` pairs, comma-separated) added before its closing brace,
    every other byte kept."""
    end = body.rstrip().rfind(b"}")
    return body[:end] + b"," + members + body[end:]


@dataclass(slots=True)
class ProxyRequest:
    path: str
    model: str
    route: Route
    payload: dict[str, Any]
    body: bytes
    stream: bool
    request_id: str
    headers: RequestHeaders
    hop: str = ""  # the X-RouterPanel-Hop value sent on (``proxy.loops``)
    rewritten: dict[str, bytes] = field(default_factory=dict)
    explain: Explanation | None = None  # the request's decision record (``proxy.explain``)

    def body_for(self, served_name: str) -> bytes:
        """The client's bytes unchanged when the node serves the requested name; otherwise the
        same JSON with only ``model`` replaced (key order and every other field kept)."""
        if served_name == self.model:
            return self.body
        body = self.rewritten.get(served_name)
        if body is None:
            body = json_bytes({**self.payload, "model": served_name})
            self.rewritten[served_name] = body
        return body

    def response_headers(self, node: str) -> list[tuple[bytes, bytes]]:
        """The headers RouterPanel adds to an answer: the request id and who served it (a node's
        URL, or a PD pair ``prefill=…; decode=…``), and the explanation's summary if the client asked."""
        headers = [(b"x-request-id", self.request_id.encode("latin-1")), (b"x-routerpanel-node", node.encode())]
        explain = self.explain
        if explain is not None and explain.header:
            headers.append((HEADER, explain.summary()))
        return headers


@dataclass(slots=True)
class Outcome:
    """What happened, for metrics and the request's explanation."""

    status: int = 0
    node: str = "-"
    ttft: float | None = None
    mean_gap: float | None = None
    error: str | None = None
    # The bytes of the answer that hold its usage object: a JSON answer's body, or a stream's last
    # chunk that has one. Only a reference: the explanation keeps a short slice of it
    # (``nodes.live.explain.usage_slice``) and reads the token counts off the hot path.
    usage: bytes = b""
