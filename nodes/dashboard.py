"""The operator dashboard: a staff-only page at ``/dashboard/``, the same data as JSON at
``/dashboard/data``, and the payload the WebSocket consumer (``nodes.consumers``) pushes every second.

The payload joins the database's view of the fleet (``nodes.selectors``) with the live per-node
figures every web worker publishes to Redis (``nodes.live``). Redis being down leaves the live
figures empty (``live: false``); the page says so instead of failing.
"""

from __future__ import annotations

import datetime
from typing import Any, TypedDict

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from .choices import BadgeChoices, BreakerState, NodeHealth, NodeRole, NodeState, ServingMode, Strategy, SyncState
from .live import stats as live_stats
from .live.breakers import read_breakers_sync
from .live.connection import client as redis_client
from .live.stats import NodeFigures
from .selectors import ControlPlaneRow, FleetState, ModelCard, NodeRow, fleet_state

# How often the page gets a fresh payload over its WebSocket (and polls /dashboard/data without one).
REFRESH_SECONDS = 1.0


class DashboardNode(NodeRow):
    breaker: str | None  # the proxy's circuit breaker for this node, when known
    live: NodeFigures | None  # None: no worker has sent this node a request recently


class DashboardPayload(TypedDict):
    generated_at: str
    live: bool  # whether the live figures could be read from Redis
    nodes: list[DashboardNode]
    models: list[ModelCard]
    control_planes: list[ControlPlaneRow]


def build_payload(
    state: FleetState, live: dict[int, NodeFigures] | None, breakers: dict[int, str] | None = None
) -> DashboardPayload:
    """Join the registry with the live figures and breaker states. ``breakers`` None means they
    could not be read (shown as unknown); a node missing from a readable hash has a closed breaker."""
    figures = live or {}

    def breaker(node_id: int) -> str | None:
        return None if breakers is None else breakers.get(node_id, BreakerState.CLOSED.value)

    return DashboardPayload(
        generated_at=datetime.datetime.now(datetime.UTC).isoformat(),
        live=live is not None,
        nodes=[DashboardNode(**row, breaker=breaker(row["id"]), live=figures.get(row["id"])) for row in state["nodes"]],
        models=state["models"],
        control_planes=state["control_planes"],
    )


def current_payload() -> DashboardPayload:
    """The payload now (blocking: the database and Redis, each with short timeouts)."""
    client = redis_client()
    live = live_stats.read_fleet_stats_sync(client)
    breakers = read_breakers_sync(client) if live is not None else None  # no second wait on a dead Redis
    return build_payload(fleet_state(breakers), live, breakers)


def page_config() -> dict[str, Any]:
    """What the page's script needs once: labels and badge colours of every choice it shows
    (``nodes.choices``, their one definition)."""

    def choices(cls: type[BadgeChoices]) -> dict[str, dict[str, str]]:
        return {value: {"label": str(label), "colour": cls.colour(value)} for value, label in cls.choices}

    return {
        "refresh_seconds": REFRESH_SECONDS,
        "history_seconds": live_stats.HISTORY_SECONDS,
        "rate_window": live_stats.RATE_WINDOW,
        "sample_window": live_stats.SAMPLE_WINDOW,
        "websocket_path": "/ws/dashboard/",
        "data_path": "/dashboard/data",
        "choices": {
            "role": choices(NodeRole),
            "state": choices(NodeState),
            "health": choices(NodeHealth),
            "breaker": choices(BreakerState),
            "serving_mode": choices(ServingMode),
            "strategy": choices(Strategy),
            "sync_state": choices(SyncState),
        },
    }


@staff_member_required
def dashboard(request: HttpRequest) -> HttpResponse:
    context = {
        **admin.site.each_context(request),
        "title": "Fleet dashboard",
        "initial": current_payload(),
        "config": page_config(),
    }
    return render(request, "dashboard/index.html", context)


@staff_member_required
def dashboard_data(request: HttpRequest) -> JsonResponse:
    return JsonResponse(current_payload())
