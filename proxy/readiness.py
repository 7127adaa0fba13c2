"""Per-model readiness for ``GET /health/ready``: can every model be served by healthy nodes now?

The rules are ``nodes.rules`` (the dashboard shows the same answer): a model served in PD mode is
ready only with at least one healthy prefill and one healthy decode node; a hybrid model needs one
healthy hybrid node. "Healthy" is strict: the active health check said so (``unknown`` is not
enough) and the node's circuit breaker is not open.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nodes import rules

from .breaker import Breakers
from .snapshot import Route, Snapshot


def _healthy(route: Route, role: str, breakers: Breakers) -> int:
    return sum(
        1
        for t in route.by_role(role)
        if rules.is_healthy(routable=t.node.routable, health=t.node.health, breaker=breakers.state(t.node.id))
    )


def model_readiness(route: Route, breakers: Breakers) -> dict[str, Any]:
    healthy = {role: _healthy(route, role, breakers) for role in rules.needed_roles(route.mode)}
    return dataclasses.asdict(rules.readiness(route.mode, healthy))


def readiness(snapshot: Snapshot, breakers: Breakers) -> tuple[bool, dict[str, Any]]:
    """(every model ready, the report). Aliases are left out: they share their model's answer."""
    models = {
        name: model_readiness(route, breakers)
        for name, route in sorted(snapshot.routes.items())
        if name in route.served_names
    }
    ready = all(m["ready"] for m in models.values())
    return ready, {"ready": ready, "snapshot_version": snapshot.version, "models": models}
