"""The attempt loop: every call to an engine goes through it, the hybrid request and both PD legs.

An attempt is one try on one node: pick the node, send the caller's request, wait for the first
byte (the first chunk of a stream, or the whole answer), then try another node or deliver. The
rules live here and nowhere else:

- Before anything reached the client, a node that could not be reached (``CONNECT_ERRORS``) and,
  where the caller allows it, an answer in ``RETRY_STATUSES`` are tried again on another node of the
  same role, within the route policy's retry budget. A timeout (504) or any other failure (502)
  before the first byte is the answer; nothing is retried once the answer started.
- An attempt still waiting for its first byte when its node is ejected (``Router.eject``: the node
  was marked unhealthy, or its circuit breaker opened) stops waiting at once and counts as the
  node's failure; it is tried again on another node like an unreachable one. A silent node (a
  frozen engine accepts connections and never answers) thus costs its waiting requests the seconds
  the health checks or the breaker take to notice, not the first-token timeout.
- Waiting is bounded: a streaming attempt gets its response headers within
  ``ROUTERPANEL_PROXY_STREAM_HEADERS_TIMEOUT`` (engines send them as soon as they accept the
  request, before the prefill; a node that sends none is tried again elsewhere, and its timeout is
  the answer when none is left) and its first chunk within the policy's first-token timeout (a
  long prompt's prefill); a non-streaming answer comes whole at the end, so only the policy's
  total timeout and ejection bound it.
- When every try failed, an engine's own answer says more than a connect error: the last one is
  delivered as if it were the only one, status and body intact; otherwise the last connect error.
- Each attempt gives its node's circuit breaker a verdict (``verdict_for``): no answer, a timeout,
  a 5xx or a stream the engine broke is a failure; a 2xx delivered in full a success; a 4xx (the
  client's problem, or "busy") and an attempt cancelled under it (the client left) say nothing.
- Each attempt releases its slot, with its latency for ``min_observed_latency`` (time to the first
  chunk for a stream, since a stream's length depends on the request; the whole answer otherwise),
  and counts in the node's stats, in ``finally``: on every path, a client disconnect included.

Callers subclass ``AttemptLoop``: ``pick`` a node, ``build`` what to send, ``deliver`` an answer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import aiohttp
from django.conf import settings

from . import metrics, stats
from .deadline import Deadline
from .errors import ProxyError, engine_failed, engine_timeout
from .httpclient import Response
from .router import Router
from .snapshot import Route, Target
from .upstream import CONNECT_ERRORS, engines

if TYPE_CHECKING:
    from .explain import Explanation

# Engine answers that mean "not now, try elsewhere": overloaded, at its concurrency limit, or a
# gateway in front of it failed.
RETRY_STATUSES = frozenset({429, 502, 503})

SSE = "text/event-stream"

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Names:
    """How one kind of attempt names its node in messages, and the error codes it answers with."""

    node: str  # "Node", "Prefill node", "Decode node"
    unreachable: str
    timeout: str
    failed: str
    stream_error: str


HYBRID = Names("Node", "engine_unreachable", "engine_timeout", "engine_error", "engine_stream_error")
PREFILL = Names("Prefill node", "prefill_unreachable", "prefill_timeout", "prefill_failed", "prefill_stream_error")
DECODE = Names("Decode node", "decode_unreachable", "decode_timeout", "decode_failed", "decode_stream_error")


def verdict_for(status: int) -> bool | None:
    """The circuit breaker's verdict on an engine's answer: a 5xx is a failure, a 4xx says nothing
    about the node, anything else is a success."""
    if status >= 500:
        return False
    return None if status >= 400 else True


class Attempt:
    """One try on one node: what came back, and the verdict on it."""

    __slots__ = (
        "body",
        "cancelled",
        "ejected",
        "error",
        "first",
        "response",
        "started",
        "status",
        "streaming",
        "target",
        "ttft",
        "verdict",
        "waiting",
    )

    def __init__(self, target: Target) -> None:
        self.target = target
        self.started = time.perf_counter()
        self.response: Response | None = None
        self.status = 0  # the engine's HTTP status; 0 while none arrived
        self.streaming = False  # an SSE answer to a streaming request: ``first`` is its first chunk
        self.first = b""
        self.body = b""  # the whole answer otherwise
        self.error: ProxyError | None = None  # the node could not be reached (or, raised, a timeout or failure)
        self.verdict: bool | None = None  # for the circuit breaker: success, failure, or no say
        self.ttft: float | None = None  # time to the first chunk of a delivered stream
        self.cancelled = False  # cancelled under us: the client left, or a PD leg was called off
        self.ejected = False  # its node was ejected while it waited for the first byte
        self.waiting: Deadline | None = None  # the wait for the first byte, while it lasts

    def eject(self) -> None:
        """Stop waiting for the first byte now (``Router.eject``): the wait ends in a timeout that
        ``_send`` turns into a retry on another node."""
        waiting = self.waiting
        if waiting is not None and not waiting.expired():
            self.ejected = True
            waiting.reschedule(-1.0)  # in the past: expires on the loop's next turn

    @property
    def url(self) -> str:
        return self.target.node.url

    def content_type(self) -> bytes:
        """The engine's ``Content-Type``, as sent."""
        assert self.response is not None
        return self.response.header(b"content-type", b"application/json")


class AttemptLoop(Generic[R]):
    """Tries nodes until one answers (see the module doc); subclasses say what to pick, send and
    deliver. ``run`` returns what ``deliver`` returns."""

    __slots__ = (
        "explain",
        "first_byte_timeout",
        "headers_timeout",
        "retry_other_node",
        "retry_statuses",
        "route",
        "router",
        "stream",
    )

    names: Names = HYBRID

    def __init__(
        self,
        router: Router,
        route: Route,
        stream: bool,
        first_byte_timeout: float | None,
        *,
        retry_other_node: bool = True,
        retry_statuses: bool = True,
        explain: Explanation | None = None,
    ) -> None:
        self.router = router
        self.route = route
        self.stream = stream  # the client asked for a stream: an SSE answer is relayed as it comes
        self.first_byte_timeout = first_byte_timeout  # bounds sending and waiting for the first byte
        self.retry_other_node = retry_other_node  # False: one attempt only
        self.retry_statuses = retry_statuses  # False: only a node that could not be reached is retried
        # A stream's response headers come before the prefill: a node that sends none is silent.
        self.headers_timeout: float | None = settings.ROUTERPANEL_PROXY_STREAM_HEADERS_TIMEOUT if stream else None
        self.explain = explain  # records each attempt (``proxy.explain``)

    # -- What callers say ----------------------------------------------------------------------

    def pick(self, tried: list[int]) -> Attempt | None:
        """The next attempt, on a node not in ``tried`` (its slot acquired); None when none is left."""
        raise NotImplementedError

    def build(self, attempt: Attempt) -> tuple[str, bytes, dict[str, str]]:
        """URL, body and headers to send for ``attempt``."""
        raise NotImplementedError

    async def deliver(self, attempt: Attempt) -> R:
        """Hand the answer on; set ``attempt.verdict`` once it was delivered (and ``ttft`` for a stream)."""
        raise NotImplementedError

    def missing(self) -> ProxyError:
        """The error when not even a first node could be picked."""
        raise NotImplementedError

    def settled(self, attempt: Attempt, duration: float) -> None:
        """Called once per attempt after its slot was released (per-leg metrics)."""

    def failed(self, error: ProxyError) -> None:
        """Called when ``run`` raises ``error`` (per-leg metrics)."""

    # -- The loop ------------------------------------------------------------------------------

    async def run(self) -> R:
        attempts = self.route.policy.retry_budget + 1 if self.retry_other_node else 1
        tried: list[int] = []
        unreachable: ProxyError | None = None
        answer: Attempt | None = None  # the last engine answer that was tried elsewhere
        reason = ""
        try:
            for number in range(attempts):
                attempt = self.pick(tried)
                if attempt is None:
                    break
                if number:
                    metrics.count_retry(self.route.name, reason)
                tried.append(attempt.target.node.id)
                try:
                    reason = await self._send(attempt, retry_status=self.retry_statuses and number + 1 < attempts)
                    if not reason:
                        return await self.deliver(attempt)
                except asyncio.CancelledError:
                    attempt.cancelled = True
                    raise
                finally:
                    self._settle(attempt)
                if attempt.error is not None:
                    unreachable = attempt.error
                else:
                    answer = attempt
            if answer is not None:
                return await self.deliver(answer)
            raise unreachable or self.missing()
        except ProxyError as exc:
            self.failed(exc)
            raise

    async def _send(self, attempt: Attempt, *, retry_status: bool) -> str:
        """Send ``attempt`` and wait for its first byte. Returns why to try another node (``connect``,
        ``ejected`` or the status), or ``""`` to deliver; raises the 504 or 502 of any other failure."""
        url, body, headers = self.build(attempt)
        first_byte = self.first_byte_timeout
        headers_bound = self.headers_timeout
        names = self.names
        node_id = attempt.target.node.id
        router = self.router
        policy = self.route.policy
        total = policy.total_timeout
        loop = asyncio.get_running_loop()
        if not self.stream:
            # The whole answer is the first byte: the connection's own timer bounds it (one timer
            # less than a deadline around it); the wait below is only there to be ejected.
            if first_byte is not None and first_byte < total:
                total = first_byte
            deadline = first_deadline = None
            headers_bound = None
        else:
            first_deadline = None if first_byte is None else loop.time() + first_byte
            deadline = first_deadline
            if headers_bound is not None and (first_byte is None or headers_bound < first_byte):
                deadline = loop.time() + headers_bound
            else:
                headers_bound = None
        try:
            with Deadline(loop, deadline) as waiting:
                attempt.waiting = waiting
                router.waiting(node_id, attempt)
                explain = self.explain
                try:
                    response = await engines(loop).request(
                        "POST",
                        url,
                        body,
                        headers,
                        connect=policy.connect_timeout,
                        total=total,
                        sent=explain.settle if explain is not None and explain.pending is not None else None,
                    )
                except CONNECT_ERRORS as exc:
                    attempt.verdict = False
                    message = f"{names.node} {attempt.url} could not be reached: {exc}"
                    attempt.error = engine_failed(message, names.unreachable)
                    return "connect"
                attempt.response = response
                if headers_bound is not None:
                    waiting.reschedule(first_deadline)  # the headers came: now the first token's bound
                    headers_bound = None
                status = attempt.status = response.status
                if self.stream and status == 200 and response.content_type == SSE:
                    attempt.streaming = True
                    attempt.first = await response.content.readany()
                    return ""
                attempt.body = await response.read()
        except TimeoutError:
            attempt.verdict = False
            if attempt.ejected:
                message = (
                    f"{names.node} {attempt.url} was taken out of rotation (unhealthy or failing) before it answered."
                )
                attempt.error = engine_failed(message, names.unreachable)
                return "ejected"
            if headers_bound is not None:
                # The node accepted the connection and never started answering (a frozen engine):
                # nothing was generated, so another node may try, like one that could not be reached.
                message = f"{names.node} {attempt.url} sent no response headers within {headers_bound:g} s."
                attempt.error = engine_timeout(message, names.timeout)
                return "headers_timeout"
            message = f"{names.node} {attempt.url} did not answer within {self._first_byte_bound():g} s."
            attempt.error = engine_timeout(message, names.timeout)
            raise attempt.error from None
        except aiohttp.ClientError as exc:
            attempt.verdict = False
            message = f"{names.node} {attempt.url} failed before answering: {exc}"
            attempt.error = engine_failed(message, names.failed)
            raise attempt.error from None
        finally:
            attempt.waiting = None
            router.done_waiting(node_id, attempt)
        if retry_status and status in RETRY_STATUSES:
            attempt.verdict = verdict_for(status)
            return str(status)
        return ""

    def _first_byte_bound(self) -> float:
        total = self.route.policy.total_timeout
        return total if self.first_byte_timeout is None else min(self.first_byte_timeout, total)

    def _settle(self, attempt: Attempt) -> None:
        """Close the answer, release the slot with the verdict and latency, count the attempt."""
        explain = self.explain
        if explain is not None and explain.pending is not None:
            explain.settle()  # the pick's figures, if nothing read them yet: before its slot goes
        if attempt.response is not None:
            attempt.response.close()  # a no-op once the body was read; drops the connection otherwise
        duration = time.perf_counter() - attempt.started
        verdict = attempt.verdict
        ttft = attempt.ttft if verdict else None
        latency = (duration if ttft is None else ttft) if verdict else None
        self.router.release(attempt.target, latency, ok=verdict)
        stats.record(
            attempt.target.node.id,
            status=attempt.status,
            elapsed=duration if verdict else None,
            ttft=ttft,
            client_gone=attempt.cancelled,
        )
        if explain is not None:
            explain.attempted(attempt, duration)
        self.settled(attempt, duration)
