"""Usage of a PD answer: prompt tokens from the prefill, completion tokens from the decode.

The decode engine counts only the tokens it saw; the client is owed the prompt the prefill read.
"""

from __future__ import annotations

from typing import Any

from ..request import JSON_ERRORS, parse_json
from .core import LegAnswer, dumps


def prefill_prompt_tokens(answer: LegAnswer) -> int | None:
    usage = (answer.data or {}).get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None


def _merge(usage: Any, prompt_tokens: int) -> bool:
    if not isinstance(usage, dict):
        return False
    usage["prompt_tokens"] = prompt_tokens
    completion = usage.get("completion_tokens")
    if isinstance(completion, int):
        usage["total_tokens"] = prompt_tokens + completion
    return True


_USAGE_KEY = b'"usage":'


def merge_usage(body: bytes, prompt_tokens: int | None) -> bytes:
    """The decode's JSON answer with the prefill's prompt tokens in its usage."""
    # ``find``, not ``in``: see ``_head`` in routerpanel.proxylane (bytes' ``in`` costs an exception).
    if prompt_tokens is None or body.find(_USAGE_KEY) < 0:
        return body
    spliced = _splice_usage(body, prompt_tokens)
    if spliced is not None:
        return spliced
    try:
        data = parse_json(body)
    except JSON_ERRORS:
        return body
    if not isinstance(data, dict) or not _merge(data.get("usage"), prompt_tokens):
        return body
    return dumps(data)


def _splice_usage(body: bytes, prompt_tokens: int) -> bytes | None:
    """The answer with only its ``usage`` object re-encoded, every other byte the engine's, when
    ``usage`` is the last member of the answer's object (as every engine sends it); None otherwise.

    The last ``"usage":`` in the body is a key (a quote inside a string is escaped, so none ends in
    ``usage":``), and what lies between it and the body's last ``}`` is its value only when it is the
    outermost object's last member: otherwise that stretch is not one JSON value and does not parse."""
    at = body.rfind(_USAGE_KEY)
    if at < 1 or body[at - 1] not in b"{, \t\r\n":
        return None
    start = at + len(_USAGE_KEY)
    end = body.rfind(b"}")
    if end <= start or body[end + 1 :].strip():
        return None
    try:
        usage = parse_json(body[start:end])
    except JSON_ERRORS:
        return None
    if not _merge(usage, prompt_tokens):
        return None
    return body[:start] + dumps(usage) + body[end:]


def merge_usage_events(chunk: bytes, prompt_tokens: int | None) -> bytes:
    """``merge_usage`` for the usage event of a stream (``stream_options.include_usage``). Only
    chunks that carry a complete usage event are touched; every other byte passes through."""
    if prompt_tokens is None or chunk.find(b'"prompt_tokens"') < 0:
        return chunk
    events = chunk.split(b"\n\n")
    changed = False
    for i, event in enumerate(events):
        if event.startswith(b"data: {") and event.find(b'"prompt_tokens"') >= 0:
            try:
                data = parse_json(event[6:])
            except JSON_ERRORS:
                continue
            if isinstance(data, dict) and _merge(data.get("usage"), prompt_tokens):
                events[i] = b"data: " + dumps(data)
                changed = True
    return b"\n\n".join(events) if changed else chunk
