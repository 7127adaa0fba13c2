"""Usage of a PD answer: prompt tokens from the prefill, completion tokens from the decode.

The decode engine counts only the tokens it saw; the client is owed the prompt the prefill read.
"""

from __future__ import annotations

import json
from typing import Any

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


def merge_usage(body: bytes, prompt_tokens: int | None) -> bytes:
    """The decode's JSON answer with the prefill's prompt tokens in its usage."""
    if prompt_tokens is None or b'"usage"' not in body:
        return body
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    if not isinstance(data, dict) or not _merge(data.get("usage"), prompt_tokens):
        return body
    return dumps(data)


def merge_usage_events(chunk: bytes, prompt_tokens: int | None) -> bytes:
    """``merge_usage`` for the usage event of a stream (``stream_options.include_usage``). Only
    chunks that carry a complete usage event are touched; every other byte passes through."""
    if prompt_tokens is None or b'"prompt_tokens"' not in chunk:
        return chunk
    events = chunk.split(b"\n\n")
    changed = False
    for i, event in enumerate(events):
        if event.startswith(b"data: {") and b'"prompt_tokens"' in event:
            try:
                data = json.loads(event[6:])
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and _merge(data.get("usage"), prompt_tokens):
                events[i] = b"data: " + dumps(data)
                changed = True
    return b"\n\n".join(events) if changed else chunk
