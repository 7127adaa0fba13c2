"""The two legs of a PD request, each run through the attempt loop (``proxy.attempts``), and the
answers a prefill gives the client itself.

The prefill leg's answer goes back to the orchestration (``proxy.pd.flows``), never straight to the
client; the decode leg's answer is the client's, streamed or not, with the prefill's prompt tokens
merged into its usage. What each leg sends is the engine protocol's (``proxy.pd.engines``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from nodes.choices import NodeRole

from .. import sse
from ..attempts import DECODE, PREFILL, Attempt, AttemptLoop, verdict_for
from ..errors import ProxyError, engine_failed
from ..loops import HOP_HEADER
from ..relay import relay_stream
from ..request import JSON_ERRORS, ProxyRequest, parse_json
from ..snapshot import ROLE_DECODE
from ..transport import send_bytes
from ..usage import taken_usage, takes_usage, with_usage
from . import metrics as pd_metrics
from .core import Leg, LegAnswer, LegRequest, PdRequest, dumps
from .usage import merge_usage, merge_usage_events

Result = TypeVar("Result")


class LegAttempt(Attempt):
    """An attempt of a PD leg: the node and, for vLLM data parallelism, its rank."""

    __slots__ = ("leg",)

    def __init__(self, leg: Leg) -> None:
        super().__init__(leg.target)
        self.leg = leg


class PdLeg(AttemptLoop[Result]):
    """One leg: first on the node picked with the pair, then on other nodes of its role."""

    __slots__ = ("build_leg", "first", "pd")

    role = ""  # NodeRole.PREFILL or NodeRole.DECODE

    def __init__(
        self,
        pd: PdRequest,
        first: Leg,
        build: Callable[[PdRequest, Leg], LegRequest],
        *,
        stream: bool,
        first_byte_timeout: float | None,
        retry_other_node: bool,
        retry_statuses: bool,
    ) -> None:
        super().__init__(
            pd.router,
            pd.route,
            stream=stream,
            first_byte_timeout=first_byte_timeout,
            retry_other_node=retry_other_node,
            retry_statuses=retry_statuses,
            explain=pd.request.explain,
        )
        self.pd = pd
        self.first = first
        self.build_leg = build

    def adopt(self, leg: Leg) -> None:
        """The pair now uses ``leg`` for this role (response header, per-pair protocol state)."""
        raise NotImplementedError

    def pick(self, tried: list[int]) -> Attempt | None:
        if not tried:
            return LegAttempt(self.first)
        leg = self.pd.choose_leg(self.role, tried)
        if leg is None:
            return None
        self.adopt(leg)
        return LegAttempt(leg)

    def build(self, attempt: Attempt) -> tuple[str, bytes, dict[str, str]]:
        assert isinstance(attempt, LegAttempt)  # not ``cast``: a C call, not a Python one
        leg = attempt.leg
        path, body, headers = self.build_leg(self.pd, leg)
        headers[HOP_HEADER] = self.pd.request.hop
        if self.role == ROLE_DECODE and takes_usage(self.pd.request, leg.target.node.engine_type) is not None:
            # For the token counts (proxy.usage); ``takes_usage`` says the client sent no stream_options.
            if isinstance(body, bytes):
                return leg.url + path, with_usage(body), headers
            body["stream_options"] = {"include_usage": True}
        return leg.url + path, body if isinstance(body, bytes) else dumps(body), headers

    def missing(self) -> ProxyError:
        return self.pd.missing(self.role)

    def settled(self, attempt: Attempt, duration: float) -> None:
        pd_metrics.observe_leg(self.route.name, self.role, duration)

    def failed(self, error: ProxyError) -> None:
        pd_metrics.count_leg_error(self.role, error.code)


class PrefillLeg(PdLeg[LegAnswer]):
    """The prefill call; bounded as a whole by the policy's first-token timeout."""

    __slots__ = ()

    names = PREFILL
    role = NodeRole.PREFILL

    def adopt(self, leg: Leg) -> None:
        self.pd.prefill = leg

    async def deliver(self, attempt: Attempt) -> LegAnswer:
        assert attempt.response is not None
        attempt.verdict = verdict_for(attempt.status)
        if attempt.status != 200:
            pd_metrics.count_leg_error(self.role, f"engine_{attempt.status}")
        assert isinstance(attempt, LegAttempt)
        return LegAnswer.parse(attempt.leg, attempt.status, attempt.body, attempt.response.content_type)


class DecodeLeg(PdLeg[None]):
    """The decode call, whose answer is the client's: any answer but a 200 is a 502."""

    __slots__ = ()

    names = DECODE
    role = NodeRole.DECODE

    def adopt(self, leg: Leg) -> None:
        self.pd.decode = leg

    def pick(self, tried: list[int]) -> Attempt | None:
        if not tried:  # the pair's decode node: its slot is this attempt's to release from now on
            return LegAttempt(self.pd.take_decode())
        return super().pick(tried)

    async def deliver(self, attempt: Attempt) -> None:
        assert isinstance(attempt, LegAttempt)
        pd = self.pd
        pd.decode_status = attempt.status
        if attempt.streaming:
            pd.outcome.node = attempt.url
            shape = takes_usage(pd.request, attempt.leg.target.node.engine_type)
            taken = None if shape is None else taken_usage(shape)
            merge = self._merge_usage if pd.prompt_tokens is not None and taken is None else None
            headers = pd.response_headers()
            complete = await relay_stream(pd.send, attempt, headers, pd.watcher, pd.outcome, DECODE, merge, taken=taken)
            if taken is not None and taken.usage:  # the client did not see it: merged for the counts only
                pd.outcome.usage = merge_usage_events(taken.usage, pd.prompt_tokens)
            if not complete:
                pd_metrics.count_leg_error("decode", pd.outcome.error or DECODE.stream_error)
            attempt.verdict = complete  # a stream the engine broke counts against it
            pd.decode_completed = bool(complete)
            return
        if attempt.status != 200:
            attempt.verdict = verdict_for(attempt.status)
            raise decode_failed(attempt.leg, attempt.status, attempt.body)
        pd.outcome.node = attempt.url
        pd.outcome.status = 200
        pd.watcher.finish()
        body = pd.outcome.usage = merge_usage(attempt.body, pd.prompt_tokens)
        await send_bytes(pd.send, 200, body, content_type=attempt.content_type(), extra=pd.response_headers())
        attempt.verdict = True
        pd.decode_completed = True

    def _merge_usage(self, chunk: bytes) -> bytes:
        return merge_usage_events(chunk, self.pd.prompt_tokens)


def run_prefill(
    pd: PdRequest, build: Callable[[PdRequest, Leg], LegRequest], *, retry: bool = True
) -> Coroutine[Any, Any, LegAnswer]:
    """The prefill leg (a coroutine: the flows run it as its own task, so a client disconnect cannot
    abort it: ``proxy.pd.flows``).

    Retried on another prefill node (unless ``retry`` is off) after a connect error or an overloaded
    answer; any other answer, error status included, is returned for the flow to pass on."""
    assert pd.prefill is not None
    leg = PrefillLeg(
        pd,
        pd.prefill,
        build,
        stream=False,
        first_byte_timeout=pd.prefill_timeout,
        retry_other_node=retry,
        retry_statuses=True,
    )
    return leg.run()


def run_decode(
    pd: PdRequest,
    build: Callable[[PdRequest, Leg], LegRequest],
    *,
    retry_other_node: bool = True,
    retry_statuses: bool = True,
) -> Coroutine[Any, Any, None]:
    """The decode leg, a coroutine to await: its answer goes to the client. Before any byte reached
    the client, a connect error (or, if ``retry_statuses``, an overloaded answer) is retried on
    another decode node unless ``retry_other_node`` is off; any other decode failure is a 502, a
    timeout a 504."""
    stream = pd.request.stream
    assert pd.decode is not None
    leg = DecodeLeg(
        pd,
        pd.decode,  # taken (``PdRequest.take_decode``) when its first attempt starts
        build,
        stream=stream,
        first_byte_timeout=pd.policy.first_token_timeout if stream else None,
        retry_other_node=retry_other_node,
        retry_statuses=retry_statuses,
    )
    return leg.run()


def decode_failed(leg: Leg, status: int, body: bytes) -> ProxyError:
    message = body[:300].decode(errors="replace")
    with contextlib.suppress(*JSON_ERRORS, AttributeError, TypeError):
        message = parse_json(body)["error"]["message"]
    return engine_failed(f"Decode node {leg.url} answered {status}: {message}", "decode_failed")


# -- Answers the prefill gives ---------------------------------------------------------------------


async def send_prefill_error(pd: PdRequest, answer: LegAnswer) -> None:
    """A failed prefill is the client's answer, its status and body intact (never a recompute)."""
    pd.outcome.status, pd.outcome.node = answer.status, answer.leg.url
    pd.outcome.error = f"prefill_{answer.status}"
    pd.watcher.finish()
    await send_bytes(
        pd.send,
        answer.status,
        answer.body,
        content_type=answer.content_type.encode("latin-1"),
        extra=pd.response_headers(),
    )


async def send_prefill_completion(pd: PdRequest, answer: LegAnswer) -> None:
    """The prefill finished the whole request (its first token was EOS): return that completion,
    as JSON, or as one SSE chunk plus ``[DONE]`` when the client asked for a stream."""
    pd.outcome.status, pd.outcome.node = 200, answer.leg.url
    pd.outcome.usage = answer.body
    pd.watcher.finish()
    if not pd.request.stream:
        await send_bytes(pd.send, 200, answer.body, extra=pd.response_headers())
        return
    body = b"data: " + dumps(completion_chunk(answer.data or {}, pd.request)) + b"\n\n" + sse.DONE
    headers = [(b"content-type", b"text/event-stream"), *sse.STREAM_HEADERS, *pd.response_headers()]
    await pd.send({"type": "http.response.start", "status": 200, "headers": headers})
    await pd.send({"type": "http.response.body", "body": body, "more_body": False})


def completion_chunk(data: dict[str, Any], request: ProxyRequest) -> dict[str, Any]:
    """A whole (non-streamed) completion as one stream chunk: ``chat.completion.chunk`` with
    ``delta {role, content}``, or a ``text_completion`` chunk; usage only if the client asked."""
    chat = request.path.endswith("/chat/completions")
    choices = []
    for i, choice in enumerate(data.get("choices") or []):
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", i)
        if chat:
            message = choice.get("message") or {}
            delta = {"role": message.get("role", "assistant"), "content": message.get("content") or ""}
            choices.append(
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": choice.get("finish_reason")}
            )
        else:
            text = choice.get("text") or ""
            choices.append(
                {"index": index, "text": text, "logprobs": None, "finish_reason": choice.get("finish_reason")}
            )
    chunk: dict[str, Any] = {
        "id": data.get("id", ""),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": data.get("created", int(time.time())),
        "model": data.get("model", request.model),
        "choices": choices,
    }
    options = request.payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") and isinstance(data.get("usage"), dict):
        chunk["usage"] = data["usage"]
    return chunk
