"""The hybrid (non-PD) data path: one node answers the whole request.

Pick a node, forward the client's body (``model`` rewritten to the name the node serves), and pass
the answer back: a JSON body with the engine's status, or an SSE stream byte for byte. Failures
before anything reached the client are retried on another node within the policy's budget;
nothing is retried once the response has started. Counters are released in ``finally`` on every
path, including a client disconnect (which arrives here as ``CancelledError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp

from nodes.choices import NodeRole

from . import metrics, stats
from .adapters import adapter_for
from .errors import ProxyError, engine_failed, engine_timeout
from .relay import Outcome, ProxyRequest, relay_stream, response_headers
from .router import Router
from .snapshot import Target
from .transport import DisconnectWatcher, Send, send_bytes
from .upstream import CONNECT_ERRORS, session, timeout_for

# Engine answers that mean "not now, try elsewhere": overloaded, at its concurrency limit, or a
# gateway in front of it failed. They are retried on another node while nothing has been sent.
RETRY_STATUSES = frozenset({429, 502, 503})

# Non-streaming requests are bounded by the total timeout only (set on the aiohttp request).
_NO_TIMEOUT = contextlib.nullcontext()


async def proxy_hybrid(
    request: ProxyRequest, send: Send, router: Router, watcher: DisconnectWatcher, outcome: Outcome
) -> None:
    route = request.route
    policy = route.policy
    attempts = policy.retry_budget + 1
    tried: list[int] = []
    last_error: ProxyError | None = None
    last_answer: tuple[Target, int, bytes, bytes] | None = None  # an engine's retryable error answer
    retry_reason = ""

    for attempt in range(attempts):
        target = router.choose(
            route, NodeRole.HYBRID, exclude=tried, headers=request.headers.routing, payload=request.payload
        )
        if target is None:
            break
        if attempt:
            metrics.count_retry(route.name, retry_reason)
        tried.append(target.node.id)
        node = target.node
        upstream = adapter_for(node.engine_type).hybrid_request(
            target, request.path, request.body_for(target.served_name), request.request_id
        )
        started = time.perf_counter()
        elapsed: float | None = None
        verdict: bool | None = None  # for the node's circuit breaker: healthy answer, failure, or no say
        response: aiohttp.ClientResponse | None = None
        first = b""
        try:
            try:
                async with asyncio.timeout(policy.first_token_timeout) if request.stream else _NO_TIMEOUT:
                    try:
                        response = await session().post(
                            upstream.url, data=upstream.body, headers=upstream.headers, timeout=timeout_for(policy)
                        )
                    except CONNECT_ERRORS as exc:
                        verdict = False
                        last_error = engine_failed(f"Node {node.url} could not be reached: {exc}", "engine_unreachable")
                        retry_reason = "connect"
                        continue
                    streaming = (
                        request.stream and response.status == 200 and response.content_type == "text/event-stream"
                    )
                    if streaming:
                        first = await response.content.readany()
                    elif response.status in RETRY_STATUSES and attempt + 1 < attempts:
                        answer = await response.read()
                        last_answer = (target, response.status, response.content_type.encode(), answer)
                        retry_reason = str(response.status)
                        verdict = False if response.status >= 500 else None
                        continue
            except TimeoutError:
                verdict = False
                raise engine_timeout(f"Node {node.url} did not answer within the policy's timeout.") from None
            except aiohttp.ClientError as exc:
                verdict = False
                raise engine_failed(f"Node {node.url} failed before answering: {exc}") from None

            outcome.node = node.url
            if streaming:
                await relay_stream(request, send, response, first, target, watcher, outcome, started)
            else:
                try:
                    answer = await response.read()
                except TimeoutError:
                    verdict = False
                    raise engine_timeout(f"Node {node.url} did not finish within the policy's timeout.") from None
                except aiohttp.ClientError as exc:
                    verdict = False
                    raise engine_failed(f"Node {node.url} failed while answering: {exc}") from None
                outcome.status = response.status
                watcher.finish()
                await send_bytes(
                    send,
                    response.status,
                    answer,
                    content_type=response.headers.get("Content-Type", "application/json").encode("latin-1"),
                    extra=response_headers(request, target),
                )
            verdict = outcome.status < 500
            if outcome.status < 500:
                # min_observed_latency compares nodes by time to the first byte of a stream (a
                # stream's length depends on the request, not the node) or by the whole answer.
                elapsed = outcome.ttft if streaming and outcome.ttft is not None else time.perf_counter() - started
            return
        finally:
            if response is not None:
                response.close()  # a no-op once the body was read; drops the connection otherwise
            router.release(target, elapsed, ok=verdict)
            stats.record(
                node.id,
                status=response.status if response is not None else 0,
                elapsed=None if elapsed is None else time.perf_counter() - started,
                ttft=outcome.ttft if elapsed is not None else None,
                client_gone=watcher.client_gone,
            )

    if last_answer is not None:
        # Every node failed: an engine's own error answer says more than a connect error, so pass
        # the last one through, status and body intact.
        target, status, content_type, answer = last_answer
        outcome.status, outcome.node, outcome.error = status, target.node.url, f"engine_{status}"
        watcher.finish()
        await send_bytes(
            send,
            status,
            answer,
            content_type=content_type or b"application/json",
            extra=response_headers(request, target),
        )
        return
    if last_error is not None:
        raise last_error
    if route.hybrid:
        raise ProxyError(503, f"Every node serving {route.name!r} is at its concurrency limit.", "no_capacity")
    raise ProxyError(503, f"No routable node serves {route.name!r} right now.", "no_routable_node")
