"""What the dashboard shows: the registry's view of the fleet joined with the live state.

The same payload is rendered into the page (``dashboard.views``) and served as JSON at
``/dashboard/data``; the WebSocket (``dashboard.consumers``) pushes it once, then every second only
what changed since (``payload_update``), so that a fleet of a thousand nodes costs the page a few
kilobytes a second rather than the whole fleet again. It joins
the database's view (``nodes.selectors``) with the live per-node figures and breaker states every
web worker publishes to Redis, and the node health the prober publishes there (``nodes.live``).
Redis being down leaves the live figures empty (``live: false``) and the health as the database
last recorded it; the page says so instead of failing.
"""

from __future__ import annotations

import datetime
from typing import Any, TypedDict

from nodes.choices import BadgeChoices, BreakerState, NodeHealth, NodeRole, NodeState, ServingMode, Strategy, SyncState
from nodes.live import health as live_health
from nodes.live import stats as live_stats
from nodes.live.breakers import read_breakers_sync
from nodes.live.connection import client as redis_client
from nodes.live.stats import NodeFigures
from nodes.selectors import ControlPlaneRow, FleetState, ModelCard, NodeRow, fleet_state

# How often the page gets a fresh payload over its WebSocket (and polls /dashboard/data without one).
REFRESH_SECONDS = 1.0
WEBSOCKET_PATH = "/ws/dashboard/"


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
    health = live_health.read_records_sync(client) if live is not None else None
    return build_payload(fleet_state(breakers, health), live, breakers)


# How far a node's per-second history may have moved between two updates and still be sent as its
# new seconds only (an update comes about every second; a late one may find two or three new).
MAX_HISTORY_SHIFT = 5


def _history_shift(before: list[int], after: list[int]) -> int | None:
    """How many seconds ``after`` moved on from ``before`` (``after`` is ``before`` without its
    first k values plus k new ones), None when it is not such a shift."""
    if len(before) != len(after):
        return None
    for shift in range(min(MAX_HISTORY_SHIFT, len(after)) + 1):
        if before[shift:] == after[: len(after) - shift]:
            return shift
    return None


def _node_update(before: DashboardNode | None, node: DashboardNode) -> dict[str, Any] | None:
    """What the page needs to turn ``before`` into ``node``: None when nothing changed; the node
    with its history as its new seconds (``history_shift`` and ``history_new``) when it moved on."""
    if before == node:
        return None
    live, old = node["live"], before["live"] if before is not None else None
    if live is None or old is None:
        return dict(node)
    shift = _history_shift(old["history"], live["history"])
    if shift is None:
        return dict(node)
    history = live["history"]
    figures = {k: v for k, v in live.items() if k != "history"}
    figures.update(history_shift=shift, history_new=history[len(history) - shift :])
    return {**node, "live": figures}


def payload_update(before: DashboardPayload | None, payload: DashboardPayload) -> dict[str, Any]:
    """The WebSocket message that brings a page showing ``before`` to ``payload``: the whole payload
    first (``type: full``), then ``type: update`` with the nodes that changed, the node order only
    when it changed, the model cards that changed (and their order when it did), and the control
    planes when they changed."""
    if before is None:
        return {"type": "full", **payload}
    old = {node["id"]: node for node in before["nodes"]}
    changed = [u for node in payload["nodes"] if (u := _node_update(old.get(node["id"]), node)) is not None]
    update: dict[str, Any] = {
        "type": "update",
        "generated_at": payload["generated_at"],
        "live": payload["live"],
        "nodes": changed,
    }
    order = [node["id"] for node in payload["nodes"]]
    if order != [node["id"] for node in before["nodes"]]:
        update["order"] = order
    if payload["models"] != before["models"]:  # the cards that changed; their order when it did
        cards = {card["name"]: card for card in before["models"]}
        update["models"] = [card for card in payload["models"] if cards.get(card["name"]) != card]
        names = [card["name"] for card in payload["models"]]
        if names != list(cards):
            update["model_order"] = names
    if payload["control_planes"] != before["control_planes"]:
        update["control_planes"] = payload["control_planes"]
    return update


def _choices(cls: type[BadgeChoices]) -> dict[str, dict[str, str]]:
    return {value: {"label": str(label), "colour": cls.colour(value)} for value, label in cls.choices}


def page_config(data_path: str) -> dict[str, Any]:
    """What the page's script needs once: where to get updates, the windows the figures cover, and
    the label and badge colour of every choice it shows (``nodes.choices``, their one definition)."""
    return {
        "refresh_seconds": REFRESH_SECONDS,
        "history_seconds": live_stats.HISTORY_SECONDS,
        "rate_window": live_stats.RATE_WINDOW,
        "sample_window": live_stats.SAMPLE_WINDOW,
        "websocket_path": WEBSOCKET_PATH,
        "data_path": data_path,
        "choices": {
            "role": _choices(NodeRole),
            "state": _choices(NodeState),
            "health": _choices(NodeHealth),
            "breaker": _choices(BreakerState),
            "serving_mode": _choices(ServingMode),
            "strategy": _choices(Strategy),
            "sync_state": _choices(SyncState),
        },
    }
