"""Per-model readiness for ``GET /health/ready``: can every model be served by healthy nodes now?

A model served in PD mode is ready only with at least one healthy prefill and one healthy decode
node; a hybrid model needs one healthy hybrid node. "Healthy" is strict: the active health check
said so (``unknown`` is not enough) and the node's circuit breaker is not open.
"""

from __future__ import annotations

from typing import Any

from nodes.choices import NodeHealth, NodeRole

from .breaker import OPEN, Breakers
from .pd import wants_pd
from .snapshot import Route, Snapshot


def _healthy(route: Route, role: str, breakers: Breakers) -> int:
    return sum(
        1 for t in route.by_role(role) if t.node.health == NodeHealth.HEALTHY and breakers.state(t.node.id) != OPEN
    )


def model_readiness(route: Route, breakers: Breakers) -> dict[str, Any]:
    pd = wants_pd(route)
    roles = (NodeRole.PREFILL, NodeRole.DECODE) if pd else (NodeRole.HYBRID,)
    counts = {role: _healthy(route, role, breakers) for role in roles}
    reasons = [f"no healthy {role} node" for role, count in counts.items() if count == 0]
    return {"ready": not reasons, "mode": "pd" if pd else "hybrid", "healthy_nodes": counts, "reasons": reasons}


def readiness(snapshot: Snapshot, breakers: Breakers) -> tuple[bool, dict[str, Any]]:
    """(every model ready, the report). Aliases are left out: they share their model's answer."""
    models = {
        name: model_readiness(route, breakers)
        for name, route in sorted(snapshot.routes.items())
        if name in route.served_names
    }
    ready = all(m["ready"] for m in models.values())
    return ready, {"ready": ready, "snapshot_version": snapshot.version, "models": models}
