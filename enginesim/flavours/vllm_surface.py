"""vLLM 0.32's endpoints beyond chat and completions: what a generation or a pooling server serves.

A generation server (``--runner generate``, the default) serves ``/v1/responses``; a pooling server
(``--runner pooling``) serves ``/v1/embeddings``, ``/v1/score`` and ``/v1/rerank`` and neither chat
nor completions (its 404 is FastAPI's ``{"detail": "Not Found"}``). Both serve ``/tokenize`` and
``/detokenize`` at the root. Requests are checked as vLLM's request models check them (required
fields, their types, the model name), refused with vLLM's 400 ``Bad Request`` schema error
(``vllm_checks.schema_error``) or 404 ``NotFoundError``. The answers carry vLLM's fields; the numbers
are deterministic functions of the input (``enginesim.textgen``).
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
import uuid
from typing import Any

from enginesim.config import SimConfig
from enginesim.flavours.vllm_checks import lax_int, read_body, schema_error, summary, vllm_error
from enginesim.http import Request, Response
from enginesim.inference import Handler
from enginesim.openai import HttpError, dumps
from enginesim.stats import RequestStats
from enginesim.textgen import (
    chat_prompt_text,
    count_prompt_tokens,
    piece,
    plan_tokens,
    prompt_token_ids,
)

EMBEDDING_SIZE = 128  # the hidden size of the tier's tiny embedding model (docs/real-engines.md)
NOT_FOUND = {"detail": "Not Found"}  # FastAPI's answer for a path the server did not register


class VllmSurface:
    """The handlers; ``routes()`` says which ones the server's runner registers."""

    def __init__(self, config: SimConfig, counters: RequestStats) -> None:
        self.config = config
        self.counters = counters

    def routes(self) -> dict[tuple[str, str], Handler]:
        routes: dict[tuple[str, str], Handler] = {
            ("POST", "/tokenize"): self.tokenize,
            ("POST", "/detokenize"): self.detokenize,
        }
        if self.config.runner == "pooling":
            routes[("POST", "/v1/embeddings")] = self.embeddings
            routes[("POST", "/v1/score")] = self.score
            routes[("POST", "/v1/rerank")] = self.rerank
        else:
            routes[("POST", "/v1/responses")] = self.responses
        return routes

    # -- Checks ------------------------------------------------------------------------------------

    def _body(self, request: Request, *required: str, body: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
        """The JSON object (``body`` when already read) and its model; a 400 for the first missing
        field of ``required`` (each may name alternatives, ``"prompt|messages"``), a 404 for a
        model the server does not serve."""
        body = read_body(request) if body is None else body
        for names in required:
            if not any(name in body for name in names.split("|")):
                first = names.split("|")[0]
                raise schema_error("missing", f"body.{first}", "Field required", body)
        model = body.get("model") or self.config.served_model_name
        if model not in self.config.accepted_model_names:
            message = f"The model `{model}` does not exist. Valid aliases: {self.config.served_model_name}."
            raise vllm_error(404, message, "NotFoundError", "model")
        return body, model

    def _ok(self, response: Response, body: dict[str, Any]) -> None:
        self.counters.by_status["200"] += 1
        response.send(200, dumps(body))

    # -- Tokenizer ---------------------------------------------------------------------------------

    async def tokenize(self, request: Request, response: Response) -> None:
        """``{"prompt"}`` or ``{"messages"}`` -> ``{"count", "max_model_len", "tokens", "token_strs"}``.

        The request model is a union of the two forms: a body that fits neither fails both, so vLLM
        reports an error per form, the prompt's first."""
        body = read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            body, _ = self._body(request)
            text = prompt
        elif "messages" in body:
            if not isinstance(body["messages"], list):
                raise schema_error("list_type", "body.messages", "Input should be a valid list", body["messages"])
            body, _ = self._body(request)
            text = chat_prompt_text(body["messages"])
        else:
            first = (
                ("missing", "body.prompt", "Field required", body)
                if "prompt" not in body
                else ("string_type", "body.prompt", "Input should be a valid string", prompt)
            )
            raise _schema_errors([first, ("missing", "body.messages", "Field required", body)])
        tokens = prompt_token_ids(text)
        strs = [piece(t).strip() for t in tokens] if body.get("return_token_strs") else None
        answer = {"count": len(tokens), "max_model_len": self.config.max_model_len, "tokens": tokens}
        self._ok(response, {**answer, "token_strs": strs})

    async def detokenize(self, request: Request, response: Response) -> None:
        """``{"tokens": [int >= 0, ...]}`` -> ``{"prompt"}``."""
        body, _ = self._body(request, "tokens")
        tokens = body["tokens"]
        if not isinstance(tokens, list):
            raise schema_error("list_type", "body.tokens", "Input should be a valid list", tokens)
        checked = [lax_int(f"tokens.{i}", token) for i, token in enumerate(tokens)]  # "2" is 2, as in pydantic
        for i, token in enumerate(checked):
            if token < 0:
                message = "Input should be greater than or equal to 0"
                raise schema_error("greater_than_equal", f"body.tokens.{i}", message, tokens[i], {"ge": 0})
        self._ok(response, {"prompt": "".join(piece(t) for t in checked).lstrip()})

    # -- Generation: the Responses API -------------------------------------------------------------

    async def responses(self, request: Request, response: Response) -> None:
        """``{"input", "max_output_tokens"?, "stream"?}`` -> a ``response`` object, or its SSE events."""
        body = read_body(request)
        if not body.get("tools") and body.get("tool_choice", "auto") in ("auto", "none"):
            body["tool_choice"] = "none"  # vLLM's check_tool_usage runs first (a schema error counts it)
        body, model = self._body(request, "input", body=body)
        text = _input_text(body["input"])
        limit = body.get("max_output_tokens")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise schema_error("int_type", "body.max_output_tokens", "Input should be a valid integer", limit)
        ids, finish = plan_tokens(text, limit, self.config.natural_tokens)
        output = "".join(piece(t) for t in ids)
        usage_in = count_prompt_tokens(text)
        rid = f"resp_{uuid.uuid4().hex}"
        done = _response_object(rid, model, output, finish, usage_in, len(ids))
        if not body.get("stream"):
            self._ok(response, done)
            return
        self.counters.by_status["200"] += 1
        response.start_stream(200)
        created = {**done, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
        events: list[tuple[str, dict[str, Any]]] = [("response.created", {"response": created})]
        events += [("response.output_text.delta", {"item_id": f"msg_{rid}", "delta": piece(t)}) for t in ids]
        events.append(("response.output_text.done", {"item_id": f"msg_{rid}", "text": output}))
        events.append(("response.completed", {"response": done}))
        for number, (kind, data) in enumerate(events):
            response.write(_event(kind, number, data))
            await response.drain()
        response.end_stream()

    # -- Pooling -----------------------------------------------------------------------------------

    async def embeddings(self, request: Request, response: Response) -> None:
        """``{"input", "encoding_format"?}`` -> ``{"id": "embd-…", "object": "list", "data", "usage"}``."""
        body, model = self._body(request, "input|messages")
        texts = _texts(body.get("input"), "body.input") if "input" in body else [chat_prompt_text(body["messages"])]
        base64_wanted = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = _vector(text)
            encoded: Any = (
                base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if base64_wanted else vector
            )
            data.append({"index": index, "object": "embedding", "embedding": encoded})
        tokens = sum(count_prompt_tokens(t) for t in texts)
        answer = {"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model}
        self._ok(response, {**answer, "data": data, "usage": _usage(tokens)})

    async def score(self, request: Request, response: Response) -> None:
        """``{"text_1", "text_2"}`` (or ``queries``/``documents``) -> ``{"object": "list", "data": [score…]}``."""
        body = read_body(request)
        # The request model's forms in vLLM's order; with none of them the first one's fields are named.
        forms = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))
        pair = next((p for p in forms if p[0] in body and p[1] in body), forms[0])
        body, model = self._body(request, *pair)
        first, second = _texts(body[pair[0]], f"body.{pair[0]}"), _texts(body[pair[1]], f"body.{pair[1]}")
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            raise vllm_error(400, "Input lengths must be either 1:1, 1:N or N:N", "BadRequestError")
        data = [
            {"index": i, "object": "score", "score": _similarity(a, b)}
            for i, (a, b) in enumerate(zip(first, second, strict=True))
        ]
        tokens = sum(count_prompt_tokens(a) + count_prompt_tokens(b) for a, b in zip(first, second, strict=True))
        answer = {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model}
        self._ok(response, {**answer, "data": data, "usage": _usage(tokens)})

    async def rerank(self, request: Request, response: Response) -> None:
        """``{"query", "documents", "top_n"?}`` -> ``{"id", "model", "usage", "results"}``, best first."""
        body, model = self._body(request, "query", "documents")
        query = body["query"]
        if not isinstance(query, str):
            raise schema_error("string_type", "body.query", "Input should be a valid string", query)
        documents = _texts(body["documents"], "body.documents")
        scored = sorted(
            (
                {"index": i, "document": {"text": d}, "relevance_score": _similarity(query, d)}
                for i, d in enumerate(documents)
            ),
            key=lambda r: -float(r["relevance_score"]),  # type: ignore[arg-type]
        )
        top_n = body.get("top_n") or 0
        tokens = sum(count_prompt_tokens(query) + count_prompt_tokens(d) for d in documents)
        results = scored[:top_n] if top_n else scored
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        self._ok(response, {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "usage": usage, "results": results})


def _schema_errors(errors: list[tuple[str, str, str, Any]]) -> HttpError:
    """Several schema errors in one 400, as vLLM's validation handler renders them."""
    rendered = [{"type": kind, "loc": loc, "msg": msg, "input": summary(value)} for kind, loc, msg, value in errors]
    message = f"{len(errors)} validation errors:\n" + "\n".join(f"  {error}" for error in rendered)
    return vllm_error(400, message, "Bad Request", errors[0][1])


def _input_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return chat_prompt_text([item for item in value if isinstance(item, dict)])
    raise schema_error("string_type", "body.input", "Input should be a valid string", value)


def _texts(value: Any, loc: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [" ".join(str(v) for v in value)]
    raise schema_error("string_type", loc, "Input should be a valid string", value)


def _vector(text: str) -> list[float]:
    """A deterministic unit vector of ``EMBEDDING_SIZE`` floats for ``text``."""
    raw = hashlib.shake_128(text.encode("utf-8", "surrogatepass")).digest(EMBEDDING_SIZE)
    values = [b - 127.5 for b in raw]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


def _similarity(a: str, b: str) -> float:
    return round(sum(x * y for x, y in zip(_vector(a), _vector(b), strict=True)), 6)


def _usage(prompt_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }


def _response_object(rid: str, model: str, text: str, finish: str, usage_in: int, usage_out: int) -> dict[str, Any]:
    """vLLM's ``ResponsesResponse``: ``incomplete`` when ``max_output_tokens`` cut it."""
    content: dict[str, Any] = {"type": "output_text", "text": text, "annotations": [], "logprobs": None}
    message = {"id": f"msg_{rid}", "type": "message", "role": "assistant", "status": "completed", "content": [content]}
    incomplete = finish == "length"
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "output": [message],
        "usage": {
            "input_tokens": usage_in,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage_out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage_in + usage_out,
        },
        "kv_transfer_params": None,
    }


def _event(kind: str, number: int, data: dict[str, Any]) -> bytes:
    """One server-sent event as vLLM writes them: ``event: <type>`` then its JSON."""
    return b"event: " + kind.encode() + b"\ndata: " + dumps({"type": kind, "sequence_number": number, **data}) + b"\n\n"
