"""The routing rules, written once: which nodes take requests, how a model is served, when it is ready.

Pure functions over plain values (strings and counts), no ORM and no I/O, so both sides use the
same definitions: the proxy when it builds its routing snapshot and answers ``GET /health/ready``
(``proxy.snapshot``, ``proxy.readiness``), and the dashboard's selectors (``nodes.selectors``).
See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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


# The (state, health) of a routable node and of a panic candidate: ``is_routable`` and
# ``is_panic_candidate`` say why; ``rotation`` compares pairs, which at thousands of nodes is several
# times cheaper than a function call per node.
ROUTABLE = (NodeState.ACTIVE.value, NodeHealth.HEALTHY.value)
PANIC_CANDIDATE = (NodeState.ACTIVE.value, NodeHealth.UNHEALTHY.value)


def is_routable(state: str, health: str) -> bool:
    """A node takes new requests when it is active and its last health verdict was healthy. A node
    never probed (``unknown``) takes none: it joins after its first successful probe (registration
    through the REST API or ``/nodes/add`` probes at once). Capacity and breakers are checked per
    request. ``health`` is the live state (``nodes.live.health``), the database's as a fallback."""
    return (state, health) == ROUTABLE


def is_panic_candidate(state: str, health: str) -> bool:
    """An active node that passed a probe once and fails now: what the panic threshold routes to
    besides the healthy ones. A node that never passed a probe stays ``unknown`` and never takes
    traffic, panic or not (it might not be an engine at all)."""
    return (state, health) == PANIC_CANDIDATE


def in_panic(healthy: int, unhealthy: int, threshold: float) -> bool:
    """Envoy's panic threshold: when fewer than ``threshold`` (0..1) of a role's probed active nodes
    pass health, the active checks are more likely wrong (or the whole role is in trouble) than
    right, and routing to all of them beats refusing every request. 0 turns it off."""
    return unhealthy > 0 and healthy < threshold * (healthy + unhealthy)


@dataclass(frozen=True, slots=True)
class Rotation:
    """Which of a role's nodes take requests now."""

    members: tuple[int, ...]  # indices into the nodes given to ``rotation``, in their order
    panic: bool  # True: below the panic threshold, routing to every candidate
    routable: int  # how many of them are routable (the serving mode counts these, not the panic ones)


def rotation(nodes: Sequence[tuple[str, str]], threshold: float) -> Rotation:
    """The nodes of one role of a model (``(state, health)`` pairs) that take requests: the
    routable ones, or, below the panic threshold, the routable ones and the panic candidates.

    The serving mode is decided on the routable counts (``serving_mode``), and only the roles that
    mode needs route in panic: a sick prefill node must not turn an ``auto`` model away from a
    healthy hybrid node."""
    healthy = [i for i, pair in enumerate(nodes) if pair == ROUTABLE]
    sick = [i for i, pair in enumerate(nodes) if pair == PANIC_CANDIDATE]
    if in_panic(len(healthy), len(sick), threshold):
        return Rotation(tuple(sorted(healthy + sick)), True, len(healthy))
    return Rotation(tuple(healthy), False, len(healthy))


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
    panic: dict[str, int] = field(default_factory=dict)  # role -> nodes it routes to in panic


def readiness(mode: str, healthy: Mapping[str, int], panic: Mapping[str, int] | None = None) -> Readiness:
    """A model served in ``mode`` with ``healthy`` nodes per role (see ``is_healthy``) is ready
    when every role it needs has at least one. ``panic`` names the roles routing to all their
    candidates (``rotation``) and how many: shown, but it does not make a model ready."""
    counts = {role: healthy.get(role, 0) for role in needed_roles(mode)}
    reasons = [f"no healthy {role} node" for role, count in counts.items() if count == 0]
    return Readiness(ready=not reasons, mode=mode, healthy_nodes=counts, reasons=reasons, panic=dict(panic or {}))


def panic_label(role: str, count: int) -> str:
    """How the dashboard and the logs say it: "panic: routing to all 3 hybrid nodes"."""
    return f"panic: routing to all {count} {role} node{'' if count == 1 else 's'}"
