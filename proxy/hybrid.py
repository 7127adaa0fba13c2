"""The hybrid (non-PD) data path: one node answers the whole request.

Pick a hybrid node, forward the client's body (``model`` rewritten to the name the node serves),
and pass the answer back: a JSON body with the engine's status, or an SSE stream byte for byte.
Retries, circuit-breaker verdicts and releasing the node's slot are the attempt loop's
(``proxy.attempts``); this module only says what to send and how to answer.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from .attempts import HYBRID, Attempt, AttemptLoop, verdict_for
from .errors import ProxyError
from .loops import HOP_HEADER
from .relay import relay_stream
from .request import Outcome, ProxyRequest
from .router import Router
from .snapshot import ROLE_HYBRID
from .transport import DisconnectWatcher, Send, send_bytes
from .usage import taken_usage, takes_usage, with_usage
from .writes import quiet


class HybridRequest(AttemptLoop[None]):
    """Every supported engine speaks plain OpenAI in hybrid mode: POST the client's body (model
    rewritten) to the same path on the node."""

    __slots__ = ("outcome", "request", "send", "watcher")

    names = HYBRID

    def __init__(
        self, request: ProxyRequest, send: Send, router: Router, watcher: DisconnectWatcher, outcome: Outcome
    ) -> None:
        first_byte = request.route.policy.first_token_timeout if request.stream else None
        super().__init__(router, request.route, request.stream, first_byte, explain=request.explain)
        self.request = request
        self.send = send
        self.watcher = watcher
        self.outcome = outcome

    def pick(self, tried: list[int]) -> Attempt | None:
        request = self.request
        target = self.router.choose(
            self.route,
            ROLE_HYBRID,
            exclude=tried,
            headers=request.headers.routing,
            payload=request.payload,
            explain=request.explain,
            # On a quiet loop the request is written at once: its pick is recorded right after, while
            # the engine works (``Explanation.settle``); under load it waits for the loop's next turn
            # anyway, and recording at once costs less.
            defer=quiet(),
        )
        return None if target is None else Attempt(target)

    def build(self, attempt: Attempt) -> tuple[str, bytes, dict[str, str]]:
        request = self.request
        headers = {"Content-Type": "application/json", "X-Request-Id": request.request_id, HOP_HEADER: request.hop}
        body = request.body_for(attempt.target.served_name)
        if takes_usage(request, attempt.target.node.engine_type) is not None:  # for the token counts (proxy.usage)
            body = with_usage(body)
        return attempt.url + request.path, body, headers

    async def deliver(self, attempt: Attempt) -> None:
        outcome = self.outcome
        outcome.node = attempt.url
        headers = self.request.response_headers(attempt.url)
        if attempt.streaming:
            shape = takes_usage(self.request, attempt.target.node.engine_type)
            taken = None if shape is None else taken_usage(shape)
            attempt.verdict = await relay_stream(
                self.send, attempt, headers, self.watcher, outcome, HYBRID, taken=taken
            )
            return
        outcome.status = attempt.status
        outcome.usage = attempt.body
        self.watcher.finish()
        await send_bytes(self.send, attempt.status, attempt.body, content_type=attempt.content_type(), extra=headers)
        attempt.verdict = verdict_for(attempt.status)

    def missing(self) -> ProxyError:
        name = self.route.name
        if self.route.hybrid:
            return ProxyError(503, f"Every node serving {name!r} is at its concurrency limit.", "no_capacity")
        return ProxyError(503, f"No routable node serves {name!r} right now.", "no_routable_node")


def proxy_hybrid(
    request: ProxyRequest, send: Send, router: Router, watcher: DisconnectWatcher, outcome: Outcome
) -> Coroutine[Any, Any, None]:
    """The hybrid path for one request (a coroutine to await: no frame of its own on the hot path)."""
    return HybridRequest(request, send, router, watcher, outcome).run()
