"""The operator dashboard: a staff-only page at ``/dashboard/``, the same data as JSON at
``/dashboard/data``, and the payload the WebSocket consumer (``nodes.consumers``) pushes every second.

The payload joins the database's view of the fleet (``nodes.selectors``) with the live per-node
figures every web worker publishes to Redis (``proxy.stats``). Redis being down leaves the live
figures empty (``live: false``); the page says so instead of failing.
"""

from __future__ import annotations

import datetime
from typing import TypedDict

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from proxy import stats
from proxy.stats import NodeFigures

from . import bus
from .choices import NodeHealth, NodeRole, NodeState, ServingMode, Strategy, SyncState
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
    breakers = breakers or {}
    figures = live or {}
    return DashboardPayload(
        generated_at=datetime.datetime.now(datetime.UTC).isoformat(),
        live=live is not None,
        nodes=[
            DashboardNode(**row, breaker=breakers.get(row["id"]), live=figures.get(row["id"])) for row in state["nodes"]
        ],
        models=state["models"],
        control_planes=state["control_planes"],
    )


def current_payload() -> DashboardPayload:
    """The payload now (blocking: the database and Redis, each with short timeouts)."""
    return build_payload(fleet_state(), stats.read_fleet_stats_sync(bus.client()))


def page_config() -> dict:
    """What the page's script needs once: labels and badge colours of every choice it shows."""

    def choices(cls) -> dict[str, dict[str, str]]:
        return {value: {"label": str(label), "colour": cls.colour(value)} for value, label in cls.choices}

    return {
        "refresh_seconds": REFRESH_SECONDS,
        "history_seconds": stats.HISTORY_SECONDS,
        "websocket_path": "/ws/dashboard/",
        "data_path": "/dashboard/data",
        "choices": {
            "role": choices(NodeRole),
            "state": choices(NodeState),
            "health": choices(NodeHealth),
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
