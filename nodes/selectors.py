"""Reads for the operator dashboard: nodes, per-model readiness, control planes' sync state, and the
Requests page's filter options.

Plain queries returning JSON-ready TypedDicts (the dashboard's page, its ``/dashboard/data`` view
and its WebSocket consumer all send the same shapes). Blocking: call them from a sync view or
through ``database_sync_to_async``. Node health is live state: the callers pass the prober's records
(``nodes.live.health``), and a node without one shows the health the database last recorded.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, TypedDict, cast

from django.conf import settings
from django.db.models import Q, Sum
from django.urls import reverse

from . import rules
from .choices import NodeRole, NodeState, ServingMode, SyncState
from .live.health import HealthRecord
from .masking import mask_credentials
from .models import ApiKey, ControlPlane, ModelAlias, Node, RoutePolicy, UsageHour


class NodeRow(TypedDict):
    id: int
    url: str
    name: str
    engine_type: str
    role: str
    state: str
    health: str
    routable: bool
    models: list[str]
    consecutive_failures: int
    last_checked_at: str | None
    admin_url: str


class ModelCard(TypedDict):
    name: str
    strategy: str
    serving_mode: str  # as configured: hybrid, pd or auto
    effective_mode: str  # what the proxy does now: hybrid or pd
    ready: bool
    reasons: list[str]  # why the model is not ready (empty when it is)
    panic: dict[str, int]  # role -> nodes it routes to below its panic threshold (``nodes.rules.in_panic``)
    panic_notes: list[str]  # the same, as the page says it ("panic: routing to all 3 hybrid nodes")
    nodes: list[int]


class ControlPlaneRow(TypedDict):
    id: int
    name: str
    address: str
    scope: str
    enabled: bool
    sync_state: str
    last_sync_at: str | None
    last_sync_duration_ms: int | None
    last_sync_error: str
    nodes: int
    admin_url: str


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def node_rows(health: Mapping[int, HealthRecord] | None = None) -> list[NodeRow]:
    """Every node, gone ones too (an operator sees what vanished), ordered by URL, with its live
    health from ``health`` (the prober's records) when it has one."""
    health = health or {}
    models: dict[int, set[str]] = defaultdict(set)
    for node_id, served in ModelAlias.objects.filter(node__isnull=False).values_list("node_id", "served_name"):
        models[node_id].add(served)
    rows: list[NodeRow] = []
    for node in Node.objects.order_by("url").values(
        "id", "url", "name", "engine_type", "role", "state", "health", "consecutive_failures", "last_checked_at"
    ):
        record = health.get(node["id"])
        state = record.state if record else node["health"]
        rows.append(
            NodeRow(
                id=node["id"],
                url=node["url"],
                name=node["name"],
                engine_type=node["engine_type"],
                role=node["role"],
                state=node["state"],
                health=state,
                routable=rules.is_routable(node["state"], state),
                models=sorted(models[node["id"]]),
                consecutive_failures=record.failures if record else node["consecutive_failures"],
                last_checked_at=(
                    datetime.datetime.fromtimestamp(record.at, tz=datetime.UTC).isoformat()
                    if record
                    else _iso(node["last_checked_at"])
                ),
                admin_url=reverse("admin:nodes_node_change", args=[node["id"]]),
            )
        )
    return rows


def model_readiness(
    serving_mode: str,
    nodes: list[NodeRow],
    breakers: dict[int, str] | None = None,
    panic_threshold: float | None = None,
) -> tuple[bool, str, list[str], dict[str, int]]:
    """Whether a model can be served by healthy nodes now, the mode it is served in, why not, and
    the roles routing in panic: ``nodes.rules``, the proxy's ``GET /health/ready`` answer, applied
    to the model's nodes and ``breakers`` (node id -> circuit-breaker state)."""
    breakers = breakers or {}
    threshold = settings.ROUTERPANEL_HEALTH_PANIC_THRESHOLD if panic_threshold is None else panic_threshold
    rotations = {
        role: rules.rotation([(node["state"], node["health"]) for node in nodes if node["role"] == role], threshold)
        for role in NodeRole.values
    }
    healthy = dict.fromkeys(NodeRole.values, 0)
    for node in nodes:
        if rules.is_healthy(routable=node["routable"], health=node["health"], breaker=breakers.get(node["id"])):
            healthy[node["role"]] += 1
    mode = rules.serving_mode(
        serving_mode,
        routable={role: rotation.routable for role, rotation in rotations.items()},
        has_split_nodes=any(node["role"] != NodeRole.HYBRID for node in nodes),
    )
    panic = {role: len(rotations[role].members) for role in rules.needed_roles(mode) if rotations[role].panic}
    result = rules.readiness(mode, healthy, panic)
    return result.ready, result.mode, result.reasons, result.panic


def model_cards(nodes: list[NodeRow], breakers: dict[int, str] | None = None) -> list[ModelCard]:
    """One card per served model name, with its effective policy and readiness."""
    by_model: dict[str, list[NodeRow]] = defaultdict(list)
    for node in nodes:
        if node["state"] == NodeState.GONE:
            continue
        for model in node["models"]:
            by_model[model].append(node)
    policies: dict[str, Mapping[str, Any]] = {
        row["model"]: row
        for row in RoutePolicy.objects.filter(enabled=True).values(
            "model", "strategy", "serving_mode", "panic_threshold"
        )
    }
    default: Mapping[str, Any] = policies.get(
        "", {"strategy": "round_robin", "serving_mode": ServingMode.AUTO, "panic_threshold": None}
    )
    cards: list[ModelCard] = []
    for name in sorted(by_model):
        policy = policies.get(name, default)
        ready, mode, reasons, panic = model_readiness(
            policy["serving_mode"], by_model[name], breakers, policy["panic_threshold"]
        )
        cards.append(
            ModelCard(
                name=name,
                strategy=policy["strategy"],
                serving_mode=policy["serving_mode"],
                effective_mode=mode,
                ready=ready,
                reasons=reasons,
                panic=panic,
                panic_notes=[rules.panic_label(role, count) for role, count in panic.items()],
                nodes=[node["id"] for node in by_model[name]],
            )
        )
    return cards


def control_plane_rows() -> list[ControlPlaneRow]:
    counts: dict[int, int] = defaultdict(int)
    for cp_id in (
        Node.objects.filter(control_plane__isnull=False)
        .exclude(state=NodeState.GONE)
        .values_list("control_plane_id", flat=True)
    ):
        counts[cp_id] += 1
    return [
        ControlPlaneRow(
            id=cp.id,
            name=cp.name,
            address=mask_credentials(cp.address),
            scope=cp.scope,
            enabled=cp.enabled,
            sync_state=cp.sync_state or SyncState.IDLE,
            last_sync_at=_iso(cp.last_sync_at),
            last_sync_duration_ms=cp.last_sync_duration_ms,
            last_sync_error=cp.last_sync_error,
            nodes=counts[cp.id],
            admin_url=reverse("admin:nodes_controlplane_change", args=[cp.id]),
        )
        for cp in ControlPlane.objects.order_by("name")
    ]


class FleetState(TypedDict):
    nodes: list[NodeRow]
    models: list[ModelCard]
    control_planes: list[ControlPlaneRow]


def fleet_state(breakers: dict[int, str] | None = None, health: Mapping[int, HealthRecord] | None = None) -> FleetState:
    """Everything the dashboard shows from the database, in one call (a handful of queries), with
    the live state: ``breakers`` (node id -> circuit-breaker state) count in the models' readiness,
    ``health`` (the prober's records) gives each node its live health."""
    nodes = node_rows(health)
    return FleetState(nodes=nodes, models=model_cards(nodes, breakers), control_planes=control_plane_rows())


class FilterOption(TypedDict):
    value: str
    label: str


class RequestFilterOptions(TypedDict):
    """What the Requests page offers to filter by: the registry's nodes, model names and API keys
    (a request explained earlier may name one since deleted; the filters take any value)."""

    nodes: list[FilterOption]
    models: list[str]
    keys: list[str]


def request_filter_options() -> RequestFilterOptions:
    nodes = [
        FilterOption(value=str(pk), label=f"{name} ({url})" if name else url)
        for pk, name, url in Node.objects.order_by("name", "url").values_list("pk", "name", "url")
    ]
    models = sorted(set(ModelAlias.objects.values_list("name", flat=True)))
    keys = sorted(set(ApiKey.objects.values_list("name", flat=True)))
    return RequestFilterOptions(nodes=nodes, models=models, keys=keys)


# -- Usage (docs/usage.md) ------------------------------------------------------------------------

USAGE_GROUPS = ("hour", "key", "model", "node")
_USAGE_COLUMNS = {"hour": "hour", "key": "key_id", "model": "model", "node": "node"}
_USAGE_SUMS = ("prompt_tokens", "completion_tokens", "requests", "errors", "ttft_ms_sum", "ttft_count")


class UsageRow(TypedDict, total=False):
    hour: str
    key_id: int
    key_name: str
    model: str
    node: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    requests: int
    errors: int
    mean_ttft_ms: float | None


def usage_rows(
    *,
    since: datetime.datetime | None = None,
    until: datetime.datetime | None = None,
    key: str | None = None,
    model: str | None = None,
    node: str | None = None,
    group_by: tuple[str, ...] = USAGE_GROUPS,
) -> list[UsageRow]:
    """The hourly usage rows in ``[since, until)`` (hours that began in it), filtered by key (its id
    or name), model and node, summed over what ``group_by`` leaves out; oldest hour first."""
    rows = UsageHour.objects.all()
    if since is not None:
        rows = rows.filter(hour__gte=since)
    if until is not None:
        rows = rows.filter(hour__lt=until)
    if key:
        rows = rows.filter(Q(key_id=int(key)) if key.isdigit() else Q(key_name=key))
    if model:
        rows = rows.filter(model=model)
    if node:
        rows = rows.filter(node=node)
    columns = [_USAGE_COLUMNS[g] for g in USAGE_GROUPS if g in group_by]
    if "key_id" in columns:
        columns.append("key_name")
    summed = rows.values(*columns).annotate(**{f"sum_{n}": Sum(n) for n in _USAGE_SUMS}).order_by(*columns)
    result: list[UsageRow] = []
    for values in summed:
        row: dict[str, Any] = {c: values[c] for c in columns}
        if "hour" in row:
            row["hour"] = row["hour"].isoformat()
        sums = {n: values[f"sum_{n}"] or 0 for n in _USAGE_SUMS}
        row.update({n: sums[n] for n in ("prompt_tokens", "completion_tokens", "requests", "errors")})
        row["total_tokens"] = sums["prompt_tokens"] + sums["completion_tokens"]
        row["mean_ttft_ms"] = round(sums["ttft_ms_sum"] / sums["ttft_count"], 1) if sums["ttft_count"] else None
        result.append(cast(UsageRow, row))
    return result


class UsageSeries(TypedDict):
    model: str
    tokens: list[int]  # one per minute, oldest first


class UsageChart(TypedDict):
    start_minute: int  # Unix minute of the first point
    series: list[UsageSeries]


def usage_chart(minutes: Mapping[int, Mapping[tuple[int, str, str], Any]], now: float, span: int = 60) -> UsageChart:
    """Tokens per minute per model over the last ``span`` minutes (the current one last), from the
    web workers' live minutes (``nodes.live.usage.read_minutes``)."""
    last = int(now // 60)
    first = last - span + 1
    per_model: dict[str, list[int]] = defaultdict(lambda: [0] * span)
    for minute, groups in minutes.items():
        if first <= minute <= last:
            for (_key, model, _node), counts in groups.items():
                per_model[model][minute - first] += counts.tokens
    series = [UsageSeries(model=m, tokens=t) for m, t in sorted(per_model.items())]
    return UsageChart(start_minute=first, series=series)
