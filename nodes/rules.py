"""The routing rules, written once: which nodes take requests, how a model is served, when it is ready.

Pure functions over plain values (strings and counts), no ORM and no I/O, so both sides use the
same definitions: the proxy when it builds its routing snapshot and answers ``GET /health/ready``
(``proxy.snapshot``, ``proxy.readiness``), and the dashboard's selectors (``nodes.selectors``).
See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .choices import BreakerState, Endpoint, EngineType, NodeHealth, NodeRole, NodeState, ServingMode

PD_ROLES = (NodeRole.PREFILL.value, NodeRole.DECODE.value)
HYBRID_ROLES = (NodeRole.HYBRID.value,)

# Each endpoint's path, on RouterPanel and on the engines (``/tokenize`` and ``/detokenize`` sit at
# the root, where vLLM and SGLang serve them).
ENDPOINT_PATHS: Mapping[str, str] = {
    Endpoint.CHAT.value: "/v1/chat/completions",
    Endpoint.COMPLETIONS.value: "/v1/completions",
    Endpoint.RESPONSES.value: "/v1/responses",
    Endpoint.EMBEDDINGS.value: "/v1/embeddings",
    Endpoint.RERANK.value: "/v1/rerank",
    Endpoint.SCORE.value: "/v1/score",
    Endpoint.TOKENIZE.value: "/tokenize",
    Endpoint.DETOKENIZE.value: "/detokenize",
}

_GENERATE = (Endpoint.CHAT.value, Endpoint.COMPLETIONS.value)
_TOKENS = (Endpoint.TOKENIZE.value, Endpoint.DETOKENIZE.value)
# What a node serves when its ``endpoints`` are left empty: what the engine serves for a generation
# model. vLLM serves the Responses API and ``/tokenize``/``/detokenize``; SGLang the two tokenizer
# endpoints (at the root too); LMDeploy and NanoDeploy chat and completions only; an OpenAI-compatible
# service the Responses API and embeddings as OpenAI does. A pooling model (embeddings, score, rerank)
# is the operator's to say (docs/architecture.md).
DEFAULT_ENDPOINTS: Mapping[str, frozenset[str]] = {
    EngineType.VLLM.value: frozenset((*_GENERATE, Endpoint.RESPONSES.value, *_TOKENS)),
    EngineType.SGLANG.value: frozenset((*_GENERATE, *_TOKENS)),
    EngineType.LMDEPLOY.value: frozenset(_GENERATE),
    EngineType.NANODEPLOY.value: frozenset(_GENERATE),
    EngineType.OPENAI.value: frozenset((*_GENERATE, Endpoint.RESPONSES.value, Endpoint.EMBEDDINGS.value)),
}


def node_endpoints(engine_type: str, endpoints: list[str] | tuple[str, ...] | None) -> frozenset[str]:
    """What a node serves: its own list, or its engine type's default when the list is empty."""
    if endpoints:
        return frozenset(endpoints)
    return DEFAULT_ENDPOINTS.get(engine_type, frozenset(_GENERATE))


def concurrency_limit(value: int | None) -> int | None:
    """A concurrency limit as stored (a node's ``max_concurrency``, a key's ``max_concurrent``) as
    the proxy applies it: 0 and empty both mean no limit, on keys as on nodes (to stop a key,
    deactivate it)."""
    return value or None


def is_routable(state: str, health: str) -> bool:
    """A node takes new requests when it is active and not known to be unhealthy (``unknown``
    is routable: a node just added serves at once). Capacity and breakers are checked per request."""
    return state == NodeState.ACTIVE and health != NodeHealth.UNHEALTHY


def is_healthy(*, routable: bool, health: str, breaker: str | None) -> bool:
    """A node counts towards a model's readiness when it is routable, its probe said healthy
    (``unknown`` is not enough) and its circuit breaker is not open."""
    return routable and health == NodeHealth.HEALTHY and breaker != BreakerState.OPEN


def serving_mode(configured: str, *, routable: Mapping[str, int], has_split_nodes: bool) -> str:
    """How a model is served now: ``pd`` or ``hybrid``.

    ``configured`` is the route policy's mode (``hybrid``, ``pd`` or ``auto``); ``routable`` counts
    the model's routable nodes per role; ``has_split_nodes`` says whether any of its nodes (routable
    or not) is a prefill or decode node. ``auto`` is PD when a routable prefill and a routable decode
    node exist; with no routable hybrid node but some prefill or decode node it is PD too, so a
    client's 503 names the role that is missing.
    """
    if configured == ServingMode.PD:
        return ServingMode.PD.value
    if configured == ServingMode.HYBRID:
        return ServingMode.HYBRID.value
    if routable.get(NodeRole.PREFILL, 0) and routable.get(NodeRole.DECODE, 0):
        return ServingMode.PD.value
    if not routable.get(NodeRole.HYBRID, 0) and has_split_nodes:
        return ServingMode.PD.value
    return ServingMode.HYBRID.value


def needed_roles(mode: str) -> tuple[str, ...]:
    """The roles a model served in ``mode`` needs a node of: prefill and decode, or hybrid."""
    return PD_ROLES if mode == ServingMode.PD else HYBRID_ROLES


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether a model can be served by healthy nodes now, and why not."""

    ready: bool
    mode: str  # pd or hybrid
    healthy_nodes: dict[str, int]  # per needed role
    reasons: list[str]  # empty when ready


def readiness(mode: str, healthy: Mapping[str, int]) -> Readiness:
    """A model served in ``mode`` with ``healthy`` nodes per role (see ``is_healthy``) is ready
    when every role it needs has at least one."""
    counts = {role: healthy.get(role, 0) for role in needed_roles(mode)}
    reasons = [f"no healthy {role} node" for role, count in counts.items() if count == 0]
    return Readiness(ready=not reasons, mode=mode, healthy_nodes=counts, reasons=reasons)
