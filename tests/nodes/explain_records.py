"""Request explanations for the readers' tests: built by the proxy's own ``Explanation`` (so they
are what a web worker stores) and appended to the test Redis the way its loop does."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from proxy.explain import Explainer, Explanation
from proxy.request import Outcome
from proxy.snapshot import KeyView, NodeView, PolicyView, Route, Target

NODES = [
    NodeView(id=i, url=f"http://n{i}:8000", engine_type="openai", role="hybrid", state="active", health="healthy")
    for i in (1, 2, 3)
]


class _Load:
    def inflight(self, node_id: int) -> int:
        return 0

    def latency(self, node_id: int) -> float:
        return 0.0


class _Router:
    load = _Load()


def route(model: str) -> Route:
    targets = tuple(Target(node, model) for node in NODES)
    return Route(model, PolicyView(model=model), targets, targets, (), (), frozenset({model}), "hybrid")


def explanation(request_id: str, *, model: str = "m", node: int = 1, status: int = 200, key: str = "k") -> Explanation:
    """A finished-looking request for ``model`` that the router sent to ``node`` (1 to 3)."""
    item = Explanation(
        request_id,
        KeyView(id=1, name=key, allowed_models=frozenset()),
        model,
        "/v1/completions",
        False,
        time.perf_counter(),
        False,
    )
    item.route = route(model)
    target = item.route.targets[node - 1]
    item.chose(_Router(), "hybrid", len(item.route.hybrid), None, (target,))  # type: ignore[arg-type]
    item.status = status
    return item


async def flush_all(redis_url: str, explainer: Explainer, items: list[Explanation]) -> None:
    """Finish ``items`` and flush them all, as a worker's loop would."""
    for item in items:
        explainer.finish(item, Outcome(status=item.status))
    client = aioredis.Redis.from_url(redis_url)
    try:
        while explainer.buffer:
            await explainer.flush(client)
    finally:
        await client.aclose()


def store(redis_url: str, items: list[Explanation]) -> None:
    """``flush_all`` for synchronous tests."""
    asyncio.run(flush_all(redis_url, Explainer(), items))
