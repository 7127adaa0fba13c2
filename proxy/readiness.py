"""Per-model readiness for ``GET /health/ready``: can every model be served by healthy nodes now?

The rules are ``nodes.rules`` (the dashboard shows the same answer): a model served in PD mode is
ready only with at least one healthy prefill and one healthy decode node; a hybrid model needs one
healthy hybrid node. "Healthy" is strict: the active health check said so (``unknown`` is not
enough; the live state, ``Snapshot.health_of``) and the node's circuit breaker is not open. A role
below its panic threshold is reported (``panic``: how many nodes it routes to) without counting
its sick nodes as healthy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nodes import rules

from .breaker import Breakers
from .snapshot import Route, Snapshot


def _healthy(snapshot: Snapshot, route: Route, role: str, breakers: Breakers) -> int:
    count = 0
    for target in route.by_role(role):
        node = target.node
        health = snapshot.health_of(node)
        routable = rules.is_routable(node.state, health)
        count += rules.is_healthy(routable=routable, health=health, breaker=breakers.state(node.id))
    return count


def model_readiness(snapshot: Snapshot, route: Route, breakers: Breakers) -> dict[str, Any]:
    healthy = {role: _healthy(snapshot, route, role, breakers) for role in rules.needed_roles(route.mode)}
    panic = {role: len(route.by_role(role)) for role in route.panic}
    return dataclasses.asdict(rules.readiness(route.mode, healthy, panic))


def readiness(snapshot: Snapshot, breakers: Breakers) -> tuple[bool, dict[str, Any]]:
    """(every model ready, the report). Aliases are left out: they share their model's answer."""
    models = {
        name: model_readiness(snapshot, route, breakers)
        for name, route in sorted(snapshot.routes.items())
        if name in route.served_names
    }
    ready = all(m["ready"] for m in models.values())
    return ready, {"ready": ready, "snapshot_version": snapshot.version, "models": models}
