"""The PD request: pair selection, the two legs, the answer to the client, and leak-free clean-up.

A ``PdRequest`` holds one client request's prefill and decode legs. The engine protocols in
``proxy.pd.engines`` tell it what to send; it does the sending, the timeouts, the retries before any
byte reached the client, the relaying, and the releasing of every counter in ``finally``.

Clean-up that must finish runs in background tasks kept in ``_background`` (a strong reference, so
the loop cannot drop them) and awaited through ``asyncio.shield``: a client that disconnects cancels
the request's task, never the prefill call or the KV free behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from nodes.choices import EngineType, NodeRole, ServingMode

from .. import sse, stats
from ..errors import ProxyError, engine_failed, engine_timeout
from ..relay import Outcome, ProxyRequest
from ..router import Router
from ..snapshot import NodeView, Route, Target
from ..transport import DisconnectWatcher, Send, send_bytes
from ..upstream import CONNECT_ERRORS, session, timeout_for
from . import metrics as pd_metrics

logger = logging.getLogger(__name__)

# Engine answers that mean "not now, try elsewhere" (as on the hybrid path).
RETRY_STATUSES = frozenset({429, 502, 503})
# A KV free is a tiny call; it gets its own bound so a dead prefill cannot hold a clean-up forever.
FREE_TIMEOUT = 10.0
FREE_ATTEMPTS = 3

_background: set[asyncio.Task] = set()
_inflight = 0
_rank_ticks: dict[int, int] = {}


def spawn(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
    """Run ``coro`` as a task that survives the request's cancellation and is tracked until done."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


def pending_cleanups() -> int:
    return len(_background)


def inflight() -> int:
    return _inflight


pd_metrics.register_gauges(inflight, pending_cleanups)


def wants_pd(route: Route) -> bool:
    """Whether a request for ``route`` goes the PD way: its serving mode, decided when the snapshot
    was built by the one rule, ``nodes.rules.serving_mode``."""
    return route.mode == ServingMode.PD


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def host_port(node: NodeView) -> tuple[str, int]:
    parts = urlsplit(node.url)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)


def _rank_for(node: NodeView) -> int | None:
    """vLLM data-parallel nodes are ``dp_size`` logical nodes ``url@rank``: spread over the ranks."""
    if node.engine_type != EngineType.VLLM or node.dp_size <= 1:
        return None
    tick = _rank_ticks.get(node.id, 0)
    _rank_ticks[node.id] = tick + 1
    return tick % node.dp_size


@dataclass(slots=True)
class Leg:
    role: str
    target: Target
    rank: int | None = None

    @property
    def url(self) -> str:
        return self.target.node.url

    @property
    def label(self) -> str:
        return self.url if self.rank is None else f"{self.url}@{self.rank}"

    def headers(self, request_id: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        if self.rank is not None:
            headers["X-data-parallel-rank"] = str(self.rank)
        return headers


@dataclass(slots=True)
class LegAnswer:
    """A leg's complete JSON answer (any status)."""

    leg: Leg
    status: int
    body: bytes
    content_type: str
    data: dict[str, Any] | None

    def message(self) -> str:
        error = (self.data or {}).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        return self.body[:300].decode(errors="replace")


# A leg request: (path, JSON body, headers) for the node a leg was given.
LegRequest = tuple[str, dict[str, Any], dict[str, str]]


class PdRequest:
    def __init__(
        self, request: ProxyRequest, send: Send, router: Router, watcher: DisconnectWatcher, outcome: Outcome
    ) -> None:
        self.request = request
        self.route = request.route
        self.policy = request.route.policy
        self.send = send
        self.router = router
        self.watcher = watcher
        self.outcome = outcome
        self.prefill: Leg | None = None
        self.decode: Leg | None = None
        self._decode_held = False
        self.prompt_tokens: int | None = None  # from the prefill, merged into the decode's usage
        self.upstream_request_id = request.request_id  # vLLM: one id shared by both legs
        self.left_during_prefill = False  # the client left while the (shielded) prefill ran
        self.prefill_timeout = min(self.policy.first_token_timeout, self.policy.total_timeout)

    # -- Pair selection ------------------------------------------------------------------------

    def _choose(self, role: str, exclude: list[int]) -> Leg | None:
        target = self.router.choose(
            self.route, role, exclude=exclude, headers=self.request.headers.routing, payload=self.request.payload
        )
        return None if target is None else Leg(role, target, _rank_for(target.node))

    def missing(self, role: str) -> ProxyError:
        name = self.route.name
        if not self.route.by_role(role):
            return ProxyError(
                503,
                f"No routable {role} node serves {name!r} right now (PD serving needs a prefill and a decode node).",
                f"no_{role}_node",
            )
        return ProxyError(
            503,
            f"Every {role} node serving {name!r} is at its concurrency limit or out of rotation after failures.",
            f"no_{role}_capacity",
        )

    def choose_pair(self) -> None:
        """Pick a prefill and a decode node, each role with its own strategy counters; 503 naming the
        missing role. Both slots are held from here; ``release_unused`` gives back one never used."""
        prefill = self._choose(NodeRole.PREFILL, [])
        if prefill is None:
            if not self.route.by_role(NodeRole.DECODE):
                raise ProxyError(
                    503,
                    f"No routable prefill or decode node serves {self.route.name!r} right now.",
                    "no_prefill_node",
                )
            raise self.missing(NodeRole.PREFILL)
        decode = self._choose(NodeRole.DECODE, [])
        if decode is None:
            self.router.release(prefill.target)
            raise self.missing(NodeRole.DECODE)
        self.prefill, self.decode, self._decode_held = prefill, decode, True

    def release_unused(self) -> None:
        if self._decode_held and self.decode is not None:
            self._decode_held = False
            self.router.release(self.decode.target)

    # -- Helpers -------------------------------------------------------------------------------

    def payload_for(self, leg: Leg, *, drop: tuple[str, ...] = (), **changes: Any) -> dict[str, Any]:
        """The client's JSON for ``leg``: ``model`` rewritten, ``drop`` removed, ``changes`` set."""
        payload = {k: v for k, v in self.request.payload.items() if k not in drop}
        payload["model"] = leg.target.served_name
        payload.update(changes)
        return payload

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        assert self.prefill is not None and self.decode is not None
        pair = f"prefill={self.prefill.label}; decode={self.decode.label}"
        return [(b"x-request-id", self.request.request_id.encode("latin-1")), (b"x-routerpanel-node", pair.encode())]

    async def post_json(
        self, leg: Leg, path: str, body: dict[str, Any], headers: dict[str, str], timeout: float
    ) -> LegAnswer:
        """POST ``body`` and read the whole answer within ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            async with session().post(
                leg.url + path, data=dumps(body), headers=headers, timeout=timeout_for(self.policy)
            ) as response:
                raw = await response.read()
                data = None
                if response.content_type == "application/json" or raw[:1] == b"{":
                    with contextlib.suppress(ValueError, UnicodeDecodeError):
                        parsed = json.loads(raw)
                        data = parsed if isinstance(parsed, dict) else None
                return LegAnswer(leg, response.status, raw, response.content_type or "application/json", data)

    # -- Prefill -------------------------------------------------------------------------------

    async def run_prefill(self, build: Callable[[Leg], LegRequest], *, retry: bool = True) -> LegAnswer:
        """The prefill leg (run as its own task, so a client disconnect cannot abort it half-way).

        Retried on another prefill node (within the policy's budget) after a connect error or an
        overloaded answer; every other failure is the client's answer. Each slot is released here.
        """
        assert self.prefill is not None
        attempts = self.policy.retry_budget + 1 if retry else 1
        leg = self.prefill
        tried = [leg.target.node.id]
        last_error: ProxyError | None = None
        last_answer: LegAnswer | None = None
        for attempt in range(attempts):
            if attempt:
                next_leg = self._choose(NodeRole.PREFILL, tried)
                if next_leg is None:
                    break
                leg = self.prefill = next_leg
                tried.append(leg.target.node.id)
            started = time.perf_counter()
            elapsed: float | None = None
            status = 0
            verdict: bool | None = None  # for the node's circuit breaker (None: no say)
            try:
                path, body, headers = build(leg)
                answer = await self.post_json(leg, path, body, headers, self.prefill_timeout)
                status = answer.status
                verdict = status < 500
                if answer.status in RETRY_STATUSES and attempt + 1 < attempts:
                    last_answer = answer
                    continue
                if answer.status < 500:
                    elapsed = time.perf_counter() - started
                if answer.status != 200:
                    pd_metrics.count_leg_error("prefill", f"engine_{answer.status}")
                return answer
            except CONNECT_ERRORS as exc:
                verdict = False
                last_error = engine_failed(f"Prefill node {leg.url} could not be reached: {exc}", "prefill_unreachable")
                last_answer = None
                continue
            except TimeoutError:
                verdict = False
                pd_metrics.count_leg_error("prefill", "prefill_timeout")
                raise engine_timeout(
                    f"Prefill node {leg.url} did not answer within {self.prefill_timeout:g} s.", "prefill_timeout"
                ) from None
            except aiohttp.ClientError as exc:
                verdict = False
                pd_metrics.count_leg_error("prefill", "prefill_failed")
                raise engine_failed(f"Prefill node {leg.url} failed: {exc}", "prefill_failed") from None
            finally:
                self.router.release(leg.target, elapsed, ok=verdict)
                duration = time.perf_counter() - started
                pd_metrics.observe_leg(self.route.name, "prefill", duration)
                stats.record(leg.target.node.id, status=status, elapsed=duration if status else None)
        if last_answer is not None:
            pd_metrics.count_leg_error("prefill", f"engine_{last_answer.status}")
            return last_answer
        pd_metrics.count_leg_error("prefill", last_error.code if last_error else "no_prefill_node")
        raise last_error or self.missing(NodeRole.PREFILL)

    async def send_prefill_error(self, answer: LegAnswer) -> None:
        """A failed prefill is the client's answer, its status and body intact (never a recompute)."""
        self.outcome.status, self.outcome.node = answer.status, answer.leg.url
        self.outcome.error = f"prefill_{answer.status}"
        self.watcher.finish()
        await send_bytes(
            self.send,
            answer.status,
            answer.body,
            content_type=answer.content_type.encode("latin-1"),
            extra=self.response_headers(),
        )

    async def send_prefill_completion(self, answer: LegAnswer) -> None:
        """The prefill finished the whole request (its first token was EOS): return that completion,
        as JSON, or as one SSE chunk plus ``[DONE]`` when the client asked for a stream."""
        self.outcome.status, self.outcome.node = 200, answer.leg.url
        self.watcher.finish()
        if not self.request.stream:
            await send_bytes(self.send, 200, answer.body, extra=self.response_headers())
            return
        body = b"data: " + dumps(completion_chunk(answer.data or {}, self.request)) + b"\n\n" + sse.DONE
        headers = [(b"content-type", b"text/event-stream"), *sse.STREAM_HEADERS, *self.response_headers()]
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    # -- Decode --------------------------------------------------------------------------------

    async def run_decode(
        self, build: Callable[[Leg], LegRequest], *, retry: bool = True, retry_statuses: bool = True
    ) -> None:
        """The decode leg: its answer goes to the client (streamed or not). Before any byte reached
        the client, a connect error (or, if allowed, an overloaded answer) is retried on another decode
        node; any other decode failure is a 502, a timeout a 504."""
        assert self.decode is not None
        self._decode_held = False  # released below from here on
        attempts = self.policy.retry_budget + 1 if retry else 1
        leg = self.decode
        tried = [leg.target.node.id]
        last_error: ProxyError | None = None
        stream = self.request.stream
        for attempt in range(attempts):
            if attempt:
                next_leg = self._choose(NodeRole.DECODE, tried)
                if next_leg is None:
                    break
                leg = self.decode = next_leg
                tried.append(leg.target.node.id)
            started = time.perf_counter()
            elapsed: float | None = None
            verdict: bool | None = None  # for the node's circuit breaker (None: no say, e.g. client left)
            response: aiohttp.ClientResponse | None = None
            first = b""
            try:
                path, body, headers = build(leg)
                try:
                    async with asyncio.timeout(self.policy.first_token_timeout) if stream else contextlib.nullcontext():
                        try:
                            response = await session().post(
                                leg.url + path, data=dumps(body), headers=headers, timeout=timeout_for(self.policy)
                            )
                        except CONNECT_ERRORS as exc:
                            verdict = False
                            last_error = engine_failed(
                                f"Decode node {leg.url} could not be reached: {exc}", "decode_unreachable"
                            )
                            continue
                        streaming = stream and response.status == 200 and response.content_type == "text/event-stream"
                        if streaming:
                            first = await response.content.readany()
                        else:
                            answer = await response.read()
                            if response.status != 200:
                                error = decode_failed(leg, response.status, answer)
                                verdict = False if response.status >= 500 else None
                                if retry_statuses and response.status in RETRY_STATUSES and attempt + 1 < attempts:
                                    last_error = error
                                    continue
                                raise error
                except TimeoutError:
                    verdict = False
                    raise engine_timeout(
                        f"Decode node {leg.url} did not answer within the policy's timeout.", "decode_timeout"
                    ) from None
                except aiohttp.ClientError as exc:
                    verdict = False
                    raise engine_failed(
                        f"Decode node {leg.url} failed before answering: {exc}", "decode_failed"
                    ) from None
                self.outcome.node = leg.url
                if streaming:
                    await self.relay_stream(response, first, started)
                else:
                    self.outcome.status = 200
                    self.watcher.finish()
                    await send_bytes(
                        self.send,
                        200,
                        merge_usage(answer, self.prompt_tokens),
                        content_type=response.headers.get("Content-Type", "application/json").encode("latin-1"),
                        extra=self.response_headers(),
                    )
                if self.outcome.error is None:
                    # As on the hybrid path: a stream's node latency is its time to first token.
                    ttft = self.outcome.ttft if streaming else None
                    elapsed = ttft if ttft is not None else time.perf_counter() - started
                verdict = self.outcome.error is None  # a stream the engine broke counts against it
                return
            except ProxyError as exc:
                pd_metrics.count_leg_error("decode", exc.code)
                raise
            finally:
                if response is not None:
                    response.close()  # a no-op once the body was read; drops the connection otherwise
                self.router.release(leg.target, elapsed, ok=verdict)
                duration = time.perf_counter() - started
                pd_metrics.observe_leg(self.route.name, "decode", duration)
                stats.record(
                    leg.target.node.id,
                    status=response.status if response is not None else 0,
                    elapsed=None if elapsed is None else duration,
                    ttft=self.outcome.ttft if elapsed is not None else None,
                    client_gone=self.watcher.client_gone,
                )
        pd_metrics.count_leg_error("decode", last_error.code if last_error else "no_decode_node")
        raise last_error or self.missing(NodeRole.DECODE)

    async def relay_stream(self, response: aiohttp.ClientResponse, first: bytes, started: float) -> None:
        """The decode's SSE bytes as they arrive (usage merged); an error event if it fails mid-stream."""
        send = self.send
        headers = [(b"content-type", response.headers.get("Content-Type", "text/event-stream").encode("latin-1"))]
        headers += sse.STREAM_HEADERS
        headers += self.response_headers()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        self.outcome.status = 200
        merge = self.prompt_tokens is not None
        first_at = last_at = time.perf_counter()
        chunks = 0
        last = first
        try:
            if first:
                self.outcome.ttft = first_at - started
                chunk = merge_usage_events(first, self.prompt_tokens) if merge else first
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunks = 1
                async for chunk in response.content.iter_any():
                    if merge:
                        chunk = merge_usage_events(chunk, self.prompt_tokens)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    last = chunk
                    chunks += 1
                last_at = time.perf_counter()
        except (aiohttp.ClientError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                error = engine_timeout("The decode node did not finish the stream within the policy's timeout.")
            else:
                error = engine_failed(f"The decode node failed mid-stream: {exc}", "decode_stream_error")
            self.outcome.error = error.code
            pd_metrics.count_leg_error("decode", error.code)
            await send({"type": "http.response.body", "body": sse.error_event(error, after=last), "more_body": True})
        if chunks > 1:
            self.outcome.mean_gap = (last_at - first_at) / (chunks - 1)
        self.watcher.finish()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # -- Releasing KV --------------------------------------------------------------------------

    async def free_kv(self, leg: Leg, path: str, body: dict[str, Any], held: Callable[[LegAnswer], bool]) -> None:
        """POST a KV release to the prefill node. Retried only when the connection was refused (the
        engine cannot have seen it), so a release is never sent twice."""
        for attempt in range(FREE_ATTEMPTS):
            try:
                answer = await self.post_json(
                    leg, path, body, {"Content-Type": "application/json"}, min(FREE_TIMEOUT, self.prefill_timeout)
                )
            except aiohttp.ClientConnectorError as exc:
                if attempt + 1 < FREE_ATTEMPTS:
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                logger.warning("KV release %s%s %s failed: %s", leg.url, path, body, exc)
                pd_metrics.count_free("failed")
                return
            except (aiohttp.ClientError, TimeoutError) as exc:
                logger.warning("KV release %s%s %s failed: %s", leg.url, path, body, exc)
                pd_metrics.count_free("failed")
                return
            if answer.status != 200:
                logger.warning("KV release %s%s %s: %s %s", leg.url, path, body, answer.status, answer.message())
                pd_metrics.count_free("failed")
            else:
                pd_metrics.count_free("ok" if held(answer) else "not_held")
            return


def decode_failed(leg: Leg, status: int, body: bytes) -> ProxyError:
    message = body[:300].decode(errors="replace")
    with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError, TypeError):
        message = json.loads(body)["error"]["message"]
    return engine_failed(f"Decode node {leg.url} answered {status}: {message}", "decode_failed")


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
    """Usage of a PD answer: prompt tokens from the prefill, completion tokens from the decode."""
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
