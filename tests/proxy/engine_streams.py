"""Streams as each engine writes them, with and without ``stream_options.include_usage`` (continuous
usage off), for the tests of taking the usage chunk out (``proxy.usage``). Each follows its
engine's own serving code, as docs/usage.md describes: only what asking for usage changes matters,
and the JSON spelling (compact or Python's ``json.dumps``), which decides how the chunks are read.
"""

from __future__ import annotations

import json
from typing import Any

FINGERPRINT = "vllm-0.32.0-5f4e3d2c"
PIECES = ("Hel", "lo", " there")
USAGE = {"prompt_tokens": 4, "total_tokens": 7, "completion_tokens": 3}


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _spaced(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _events(events: list[bytes]) -> bytes:
    return b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def _head(kind: str, spaced: bool = False) -> dict[str, Any]:
    if kind == "chat":
        return {"id": "chatcmpl-r1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
    return {"id": "cmpl-r1", "object": "text_completion", "created": 1700000000, "model": "m"}


def vllm(*, include_usage: bool, kind: str = "chat", pieces: tuple[str, ...] = PIECES) -> bytes:
    """vLLM 0.32: chunks dumped with ``exclude_unset``, the fingerprint on the terminal chunk only
    when no usage chunk follows, which then carries it."""
    events = []
    head = _head(kind)
    for i, piece in enumerate(pieces):
        finish = "length" if i == len(pieces) - 1 else None
        if kind == "chat":
            choice = {"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
        chunk = {**head, "choices": [choice]}
        if finish and not include_usage:
            chunk["system_fingerprint"] = FINGERPRINT
        events.append(_compact(chunk))
    if include_usage:
        events.append(_compact({**head, "choices": [], "usage": USAGE, "system_fingerprint": FINGERPRINT}))
    return _events(events)


def sglang(*, include_usage: bool, kind: str = "chat", pieces: tuple[str, ...] = PIECES) -> bytes:
    """SGLang: chat chunks by msgspec (no ``usage`` key), the finish reason in a chunk of its own
    after the content; completion chunks by pydantic with ``"usage":null`` in each whatever was
    asked, the finish reason on the last one; then the usage chunk."""
    events = []
    head = _head(kind)
    if kind == "chat":
        for piece in ("", *pieces):
            delta = {"role": "assistant", "content": ""} if not piece else {"content": piece}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None, "matched_stop": None}
            events.append(_compact({**head, "choices": [choice]}))
        end = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length", "matched_stop": None}
        events.append(_compact({**head, "choices": [end]}))
    else:
        for i, piece in enumerate(pieces):
            finish = "length" if i == len(pieces) - 1 else None
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish, "matched_stop": None}
            events.append(_compact({**head, "choices": [choice], "usage": None}))
    if include_usage:
        events.append(_compact({**head, "choices": [], "usage": {**USAGE, "prompt_tokens_details": None}}))
    return _events(events)


def lmdeploy(*, include_usage: bool, kind: str = "chat", pieces: tuple[str, ...] = PIECES) -> bytes:
    """LMDeploy 0.18: chunks by ``json.dumps`` (None fields left out), each with ``"usage": null``
    added last when usage was asked for; then the usage chunk (chat: pydantic's compact JSON)."""
    events = []
    head = _head(kind)
    for i, piece in enumerate(pieces):
        choice: dict[str, Any] = {"index": 0}
        if kind == "chat":
            choice["delta"] = {"role": "assistant", "content": piece}
        else:
            choice["text"] = piece
        if i == len(pieces) - 1:
            choice["finish_reason"] = "length"
        chunk: dict[str, Any] = {**head, "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        events.append(_spaced(chunk))
    if include_usage:
        usage = {**head, "choices": [], "usage": USAGE}
        events.append(_compact(usage) if kind == "chat" else _spaced(usage))
    return _events(events)


def dlengine(*, include_usage: bool, kind: str = "chat", pieces: tuple[str, ...] = PIECES) -> bytes:
    """DLEngine (``dlengine serve``): chunks by ``json.dumps``, the finish reason in a chunk of its
    own, then the usage chunk; nothing else changes."""
    head = _head(kind)
    events = []
    if kind == "chat":
        events.append(
            _spaced({**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        )
    for piece in pieces:
        if kind == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
        else:
            choice = {"index": 0, "text": piece, "finish_reason": None}
        events.append(_spaced({**head, "choices": [choice]}))
    end = {"index": 0, "delta": {}} if kind == "chat" else {"index": 0, "text": ""}
    events.append(_spaced({**head, "choices": [{**end, "finish_reason": "length"}]}))
    if include_usage:
        events.append(_spaced({**head, "choices": [], "usage": USAGE}))
    return _events(events)


ENGINES = {"vllm": vllm, "sglang": sglang, "lmdeploy": lmdeploy, "nanodeploy": dlengine}
