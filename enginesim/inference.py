"""The parsed inference request that flavours plan an answer for, and the parsing shared by the app and flavours.

Both ``app`` and ``flavours`` import this module; it imports neither, so the two stay free of a cycle.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from enginesim.http import Request, Response
from enginesim.openai import HttpError
from enginesim.textgen import chat_prompt_text, completion_prompt_texts

Handler = Callable[[Request, Response], Awaitable[None]]


@dataclass
class InferenceRequest:
    """A parsed chat or completion request, what flavours plan an answer for."""

    request: Request
    body: dict[str, Any]
    kind: str  # "chat" or "completion"
    model: str
    prompts: list[str]
    n: int
    max_tokens: int | None
    stream: bool
    include_usage: bool

    def header(self, name: str) -> str | None:
        return self.request.header(name)


def parse_json(request: Request) -> Any:
    """The request body as JSON; a 400 (``invalid_json``) when it is not."""
    try:
        return json.loads(request.body)
    except ValueError as exc:
        raise HttpError(400, f"invalid JSON body: {exc}", code="invalid_json") from None


def parse_inference(request: Request, kind: str, *, default_model: str, accepted_models: list[str]) -> InferenceRequest:
    """Validate a chat (``kind="chat"``) or completion request the way the engines do (400 / 404 otherwise)."""
    body = parse_json(request)
    if not isinstance(body, dict):
        raise HttpError(400, "request body must be a JSON object", code="invalid_json")
    model = body.get("model", default_model)
    if model not in accepted_models:
        raise HttpError(
            404,
            f"The model `{model}` does not exist. Accepted names: {', '.join(accepted_models)}",
            code="model_not_found",
        )
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HttpError(400, "messages must be a non-empty list", code="invalid_request")
        prompts = [chat_prompt_text(messages)]
    else:
        texts = completion_prompt_texts(body.get("prompt"))
        if texts is None:
            raise HttpError(400, "prompt must be a string, a list of strings or token ids", code="invalid_request")
        prompts = texts
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise HttpError(400, "max_tokens must be a positive integer", code="invalid_request")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 64:
        raise HttpError(400, "n must be an integer between 1 and 64", code="invalid_request")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    return InferenceRequest(
        request=request,
        body=body,
        kind=kind,
        model=model,
        prompts=prompts,
        n=n,
        max_tokens=max_tokens,
        stream=bool(body.get("stream", False)),
        include_usage=include_usage,
    )
