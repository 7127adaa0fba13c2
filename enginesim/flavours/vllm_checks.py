"""What vLLM 0.32's OpenAI server refuses, in its order, with its statuses and error bodies.

vLLM answers every refusal with ``{"error": {"message", "type", "param", "code"}}`` and two kinds of
400. A body that fails the request schema (pydantic, checked first) is ``"type": "Bad Request"``,
``"message": "1 validation error:\\n  {...}"`` and ``param`` the dotted field (``body.kv_transfer_params``).
What the server refuses afterwards (the ``stream_options`` rule, lengths, sampling parameters, the
data-parallel rank) is ``"type": "BadRequestError"`` with vLLM's own sentence, followed by
``(parameter=..., value=...)`` when it names the field. An unknown model is a 404 ``NotFoundError``.
Unknown fields are accepted. ``tests/realengines/test_vllm_and_simulator_agree.py`` sends the same bodies
to a real vLLM and to this simulator and compares the answers (docs/real-engines.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from enginesim.http import Request
from enginesim.openai import HttpError
from enginesim.textgen import chat_prompt_text, completion_prompt_texts, count_prompt_tokens

_INT_FIELDS = ("max_tokens", "max_completion_tokens", "min_tokens", "n")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # CompletionRequest.max_tokens; chat has none


def vllm_error(status: int, message: str, kind: str, param: str | None = None) -> HttpError:
    """An error answered in vLLM's shape, ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return HttpError(status, message, type=kind, payload=body)


def refused(message: str, parameter: str | None = None, value: Any = None) -> HttpError:
    """vLLM's ``VLLMValidationError``: a 400 ``BadRequestError``."""
    extras = [f"parameter={parameter}"] if parameter is not None else []
    if parameter is not None and value is not None:
        extras.append(f"value={value}")
    text = f"{message} ({', '.join(extras)})" if extras else message
    return vllm_error(400, text, "BadRequestError", parameter)


def summary(value: Any) -> Any:
    """The ``input`` of a schema error, bounded as vLLM bounds it."""
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:200] + "...[truncated]"
    if isinstance(value, list | tuple | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    return str(value)


def schema_error(kind: str, loc: str, msg: str, value: Any, ctx: dict[str, Any] | None = None) -> HttpError:
    """A body that fails vLLM's request schema: a 400 ``Bad Request``."""
    error: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": summary(value)}
    if ctx:
        error["ctx"] = ctx
    return vllm_error(400, f"1 validation error:\n  {error}", "Bad Request", loc)


def lax_int(name: str, value: Any) -> int:
    """Pydantic's lax ``int``: ints, bools, whole floats and numeric strings."""
    loc = f"body.{name}"
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        return _fail_int(loc, value, "int_from_float", "got a number with a fractional part")
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
        if number is not None and number.is_integer():
            return int(number)
        return _fail_int(loc, value, "int_parsing", "unable to parse string as an integer")
    raise schema_error("int_type", loc, "Input should be a valid integer", value)


def _fail_int(loc: str, value: Any, kind: str, why: str) -> int:
    raise schema_error(kind, loc, f"Input should be a valid integer, {why}", value)


_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def _lax_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    kind = "bool_parsing" if isinstance(value, int | float | str) else "bool_type"
    why = ", unable to interpret input" if kind == "bool_parsing" else ""
    raise schema_error(kind, f"body.{name}", f"Input should be a valid boolean{why}", value)


def read_body(request: Request) -> dict[str, Any]:
    """The JSON object of a chat or completion request, or vLLM's 400 for it."""
    try:
        body = json.loads(request.body)
    except ValueError as exc:
        pos = getattr(exc, "pos", 0)
        ctx = {"error": getattr(exc, "msg", str(exc))}
        raise schema_error("json_invalid", f"body.{pos}", "JSON decode error", {}, ctx) from None
    if not isinstance(body, dict):
        msg = "Input should be a valid dictionary or object to extract fields from"
        raise schema_error("model_attributes_type", "body", msg, body)
    return body


def check_schema(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """The fields vLLM's request models check, coerced as pydantic does; the body with those values."""
    if body.get("stream_options") and not body.get("stream"):
        raise refused("Stream options can only be defined when `stream=True`.", "stream_options")
    checked = dict(body)
    if kind == "chat":
        if "messages" not in body:
            raise schema_error("missing", "body.messages", "Field required", body)
        if not isinstance(body["messages"], list):
            raise schema_error("list_type", "body.messages", "Input should be a valid list", body["messages"])
    for name in _INT_FIELDS:
        value = body.get(name)
        if value is not None or (name == "min_tokens" and name in body):
            checked[name] = lax_int(name, value)
    if body.get("stream") is not None:
        checked["stream"] = _lax_bool("stream", body["stream"])
    params = body.get("kv_transfer_params")
    if params is not None and not isinstance(params, dict):
        raise schema_error("dict_type", "body.kv_transfer_params", "Input should be a valid dictionary", params)
    return checked


@dataclass(frozen=True)
class Lengths:
    prompts: list[str]
    prompt_tokens: int  # of the longest prompt
    max_tokens: int  # the output budget the engine schedules


def check_lengths(body: dict[str, Any], kind: str, max_model_len: int) -> Lengths:
    """The prompt, the context length and the sampling parameters, as vLLM's server checks them."""
    if kind == "chat":
        if not body["messages"]:
            raise refused("Cannot apply chat template to an empty conversation. Provide at least one message.")
        prompts = [chat_prompt_text(body["messages"])]
        if body.get("max_completion_tokens") is not None:
            requested, param = body["max_completion_tokens"], "max_completion_tokens"
        else:
            requested, param = body.get("max_tokens"), "max_tokens"
    else:
        texts = completion_prompt_texts(body.get("prompt"))
        if not texts or not all(texts):
            raise refused("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
        prompts = texts
        requested, param = body.get("max_tokens", COMPLETION_DEFAULT_MAX_TOKENS), "max_tokens"
    if requested is not None and requested > max_model_len:
        raise refused(
            f"{param}={requested} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            param,
            requested,
        )
    prompt_tokens = max(count_prompt_tokens(p) for p in prompts)
    if prompt_tokens > max_model_len:
        # vLLM's tokenizer stops one token past the limit, hence "at least".
        raise refused(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains at "
            f"least {max_model_len + 1} input tokens, which exceeds this limit even without any output tokens. "
            "Please reduce the length of the input prompt.",
            "input_tokens",
            max_model_len + 1,
        )
    room = max_model_len - prompt_tokens
    max_tokens = room if requested is None else min(requested, room)
    n = body.get("n")
    if n is not None and n < 1:
        raise refused(f"n must be at least 1, got {n}.")
    if max_tokens < 1:
        raise refused(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens)
    min_tokens = body.get("min_tokens", 0)
    if min_tokens < 0:
        raise refused(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    if min_tokens > max_tokens:
        raise refused(f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.")
    return Lengths(prompts, prompt_tokens, max_tokens)


def data_parallel_rank(request: Request, dp_size: int) -> int | None:
    """``X-data-parallel-rank``: ignored when not an integer, a 400 when out of range."""
    header = request.header("x-data-parallel-rank")
    if header is None:
        return None
    try:
        rank = int(header)
    except ValueError:
        return None
    if not 0 <= rank < dp_size:
        raise refused(f"data_parallel_rank {rank} is out of range [0, {dp_size}).")
    return rank
