"""OpenAI wire shapes: response bodies, SSE chunks and error bodies the simulated engines send."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from enginesim.textgen import piece

# Made once: ``json.dumps`` with options other than its defaults builds a new encoder on every call
# (every answer the simulator writes). The same bytes either way.
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(obj: Any) -> bytes:
    return _COMPACT.encode(obj).encode()


@dataclass(frozen=True)
class StreamStyle:
    """How an engine writes a stream, as far as asking for usage changes it (the engines' serving
    code, described in the repository's docs/usage.md). Every engine adds a last chunk with
    ``choices: []`` and ``usage`` when asked; besides that:

    - ``spaced``: chunks are Python's ``json.dumps`` (``", "`` and ``": "``; LMDeploy, DLEngine);
    - ``null_usage``: ``"asked"``: every other chunk ends with ``"usage": null`` when usage was
      asked for (LMDeploy); ``"completions"``: every completion chunk carries ``"usage":null``
      whatever was asked (SGLang's pydantic chunks);
    - ``fingerprint``: vLLM's ``system_fingerprint``, on the chunk that ends the answer, or on the
      usage chunk instead when one follows;
    - ``omit_none``: a choice's fields that are null are left out (LMDeploy's ``exclude_none``).
    """

    spaced: bool = False
    null_usage: str = ""
    fingerprint: str | None = None
    omit_none: bool = False

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj).encode() if self.spaced else dumps(obj)

    def usage_event(self, chunk: dict[str, Any], kind: str) -> bytes:
        """The usage chunk (``choices: []``) of a ``kind`` ("chat" or "completion") stream."""
        if self.fingerprint:
            chunk["system_fingerprint"] = self.fingerprint
        return b"data: " + self.dumps(chunk) + b"\n\n"


PLAIN = StreamStyle()


class HttpError(Exception):
    """An error answer in OpenAI shape: ``{"error": {"message", "type", "code"}}``, or ``payload`` as
    it is when a flavour answers in its engine's own shape (a dict as JSON, a str as plain text)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: Any = None,
        payload: dict[str, Any] | str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code if code is not None else status
        self.payload = payload

    def body(self) -> dict[str, Any]:
        if isinstance(self.payload, dict):
            return self.payload
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


def error_type_for(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


@dataclass
class ChoicePlan:
    index: int
    token_ids: list[int]
    finish_reason: str


@dataclass
class Plan:
    """What one inference request answers: the choices, usage, and extra top-level fields (PD params)."""

    kind: str  # "chat" or "completion"
    model: str
    choices: list[ChoicePlan]
    prompt_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)
    response_id: str = ""
    created: int = 0
    force_non_stream: bool = False
    cacheable: bool = True
    # KV this answer allocated on a prefill: released if the engine itself drops the answer (an injected
    # close_after_chunks), since nobody can learn its id. A client that leaves does not release it.
    kv_key: int | str | None = None

    def __post_init__(self) -> None:
        if not self.response_id:
            prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
            self.response_id = prefix + os.urandom(12).hex()
        if not self.created:
            self.created = int(time.time())

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    @property
    def steps(self) -> int:
        return max((len(c.token_ids) for c in self.choices), default=0)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def full_body(self) -> dict[str, Any]:
        """The non-streaming response body."""
        if self.kind == "chat":
            choices = [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": "".join(piece(t) for t in c.token_ids)},
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for c in self.choices
            ]
            obj = "chat.completion"
        else:
            choices = [
                {
                    "index": c.index,
                    "text": "".join(piece(t) for t in c.token_ids),
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for c in self.choices
            ]
            obj = "text_completion"
        body = {
            "id": self.response_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }
        body.update(self.extra)
        return body

    def _chunk(self, choices: list[dict[str, Any]], style: StreamStyle, usage: bool, end: bool = False) -> bytes:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        if style.omit_none:
            choices = [{k: v for k, v in choice.items() if v is not None} for choice in choices]
        chunk: dict[str, Any] = {
            "id": self.response_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if (style.null_usage == "completions" and self.kind != "chat") or (style.null_usage == "asked" and usage):
            chunk["usage"] = None
        if end and style.fingerprint and not usage:
            chunk["system_fingerprint"] = style.fingerprint
        return b"data: " + style.dumps(chunk) + b"\n\n"

    def stream_steps(self, style: StreamStyle = PLAIN, include_usage: bool = False) -> list[list[bytes]]:
        """SSE events grouped by generation step (the latency model sleeps between steps).

        Chat: the first step also carries ``delta {"role": "assistant"}``; each choice's last token
        carries its ``finish_reason``. The usage chunk and ``[DONE]`` come from ``stream_tail``.
        """
        steps: list[list[bytes]] = []
        usage = include_usage
        for step in range(self.steps):
            events: list[bytes] = []
            for c in self.choices:
                if step >= len(c.token_ids):
                    continue
                last = step == len(c.token_ids) - 1
                text = piece(c.token_ids[step])
                if self.kind == "chat":
                    delta: dict[str, Any] = {"role": "assistant", "content": text} if step == 0 else {"content": text}
                    choice = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}
                    events.append(self._chunk([choice], style, usage))
                    if last:
                        end = {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}
                        events.append(self._chunk([end], style, usage, end=True))
                else:
                    choice = {
                        "index": c.index,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": c.finish_reason if last else None,
                    }
                    events.append(self._chunk([choice], style, usage, end=last))
            steps.append(events)
        return steps

    def stream_tail(self, include_usage: bool, style: StreamStyle = PLAIN) -> list[bytes]:
        events = []
        if include_usage:
            obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
            usage_chunk: dict[str, Any] = {
                "id": self.response_id,
                "object": obj,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self.usage(),
            }
            events.append(style.usage_event(usage_chunk, self.kind))
        events.append(b"data: [DONE]\n\n")
        return events
