"""The prober's view of the database: which nodes to probe and how, and the health mirror.

Blocking ORM calls: the prober runs them in a worker thread, never on its event loop.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connection
from django.utils import timezone

from .. import engine_detect
from ..choices import NodeState
from ..models import Node

# Nodes the prober watches on its own: those that take traffic, those draining (an operator drains a
# node to put it back later, and wants to know whether it is healthy meanwhile), and those pending
# approval (an operator sees a node's health, and its detected engine type, before approving it).
PROBED_STATES = (NodeState.ACTIVE.value, NodeState.PENDING.value, NodeState.DRAINING.value)

# A probe may take at most this share of its node's interval, so two probes of one node never overlap.
TIMEOUT_SHARE = 0.9

_FIELDS = ("health_interval", "health_timeout", "health_failures", "health_successes")


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    interval: float
    timeout: float
    failures: int
    successes: int


@dataclass(frozen=True, slots=True)
class Target:
    """One node as the prober probes it."""

    node_id: int
    url: str  # the node's health URL
    probe: ProbeSettings
    scheduled: bool  # probed on its interval (``PROBED_STATES``), not only on request
    detect: bool = False  # its engine type waits for it to answer (``nodes.engine_detect``)


def probe_settings(node: Mapping[str, Any], control_plane: Mapping[str, Any]) -> ProbeSettings:
    """A node's probe settings: its own, else its control plane's, else ``ROUTERPANEL_HEALTH_*``.
    The timeout is capped at ``TIMEOUT_SHARE`` of the interval."""

    def pick(name: str, default: float) -> Any:
        for source in (node, control_plane):
            value = source.get(name)
            if value is not None:
                return value
        return default

    interval = float(pick("health_interval", settings.ROUTERPANEL_HEALTH_INTERVAL))
    timeout = min(float(pick("health_timeout", settings.ROUTERPANEL_HEALTH_TIMEOUT)), interval * TIMEOUT_SHARE)
    return ProbeSettings(
        interval=interval,
        timeout=timeout,
        failures=int(pick("health_failures", settings.ROUTERPANEL_HEALTH_FAILURES)),
        successes=int(pick("health_successes", settings.ROUTERPANEL_HEALTH_SUCCESSES)),
    )


def health_url(node_url: str) -> str:
    return f"{node_url}/health"


def load_targets(node_ids: Iterable[int] | None = None) -> dict[int, Target]:
    """The nodes to probe on their interval (or, given ``node_ids``, those nodes whatever their
    state: "probe now"), with their resolved settings. One query."""
    rows = Node.objects.all() if node_ids is not None else Node.objects.filter(state__in=PROBED_STATES)
    if node_ids is not None:
        rows = rows.filter(pk__in=list(node_ids))
    columns = ["id", "url", "state", *_FIELDS, *(f"control_plane__{name}" for name in _FIELDS)]
    detect = set(
        rows.filter(**{f"metadata__{engine_detect.DETECTION_KEY}__status": engine_detect.PENDING}).values_list(
            "pk", flat=True
        )
    )
    targets: dict[int, Target] = {}
    for row in rows.values(*columns):
        own = {name: row[name] for name in _FIELDS}
        plane = {name: row[f"control_plane__{name}"] for name in _FIELDS}
        targets[row["id"]] = Target(
            node_id=row["id"],
            url=health_url(row["url"]),
            probe=probe_settings(own, plane),
            scheduled=row["state"] in PROBED_STATES,
            detect=row["id"] in detect,
        )
    return targets


def existing_ids(node_ids: Iterable[int]) -> set[int]:
    """Which of ``node_ids`` still have a row (the others were deleted)."""
    return set(Node.objects.filter(pk__in=list(node_ids)).values_list("pk", flat=True))


def stored_health(node_ids: Iterable[int]) -> dict[int, str]:
    """``Node.health`` as the database has it: the seed for nodes Redis knows nothing about."""
    return dict(Node.objects.filter(pk__in=list(node_ids)).values_list("pk", "health"))


def mirror_health(transitions: Mapping[int, str], *, checked: Iterable[int] = ()) -> None:
    """Copy health transitions to ``Node.health`` (one UPDATE per state, never audited, no
    configuration bump: the web workers route by the live state), and mark ``checked`` nodes'
    ``last_checked_at``. For the admin's filters, the REST API and a restart without Redis."""
    by_state: dict[str, list[int]] = defaultdict(list)
    for node_id, state in transitions.items():
        by_state[state].append(node_id)
    for state, ids in by_state.items():
        Node.objects.filter(pk__in=ids).update(health=state)
    checked = list(checked)
    if checked:
        Node.objects.filter(pk__in=checked).update(last_checked_at=timezone.now())


def in_thread(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an ORM call from a worker thread and close the thread's connection afterwards."""
    try:
        return func(*args, **kwargs)
    finally:
        connection.close()
