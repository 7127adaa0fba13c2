"""The routing table: an immutable, per-process snapshot of nodes, aliases, policies and API keys.

``build_snapshot()`` reads the database (a handful of queries) and is only ever called off the hot
path: at start-up and when the configuration version changes (see ``proxy.watcher``). Request
handling reads ``current()`` and never touches the ORM. A new snapshot replaces the old one in a
single assignment, so a request sees either the old table or the new one, never a mix.

Node health is live state, not configuration (docs/decisions/0008-health-as-live-state.md):
``with_health`` lays the live states (``proxy.health``) over a snapshot, recomputing only the
routes of the nodes whose health changed (which nodes of each role are in rotation, the panic
threshold, the serving mode). The database's ``Node.health`` (as read at the last rebuild) is the
fallback for a node the live state does not mention.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from django.conf import settings

from nodes import rules
from nodes.choices import NodeRole, ServingMode, Strategy
from nodes.models import ApiKey, ConfigVersion, ModelAlias, Node, RoutePolicy, hash_api_key

# The roles and the PD mode as the data path compares them on every request (``Route.by_role`` for
# every choice), looked up once: on Python 3.11 an attribute of an enum class goes through its
# metaclass's ``__getattr__`` hook, 0.85 k instructions a lookup (docs/architecture.md).
ROLE_HYBRID, ROLE_PREFILL, ROLE_DECODE = NodeRole.HYBRID, NodeRole.PREFILL, NodeRole.DECODE
MODE_PD = ServingMode.PD


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the data path needs to know about a node."""

    id: int
    url: str
    engine_type: str
    role: str
    state: str
    health: str  # as the database last recorded it: the fallback when the live state has no entry
    weight: int = 1
    max_concurrency: int = 0
    bootstrap_port: int | None = None
    dp_size: int = 1
    kv_connector_address: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    endpoints: frozenset[str] = frozenset()  # what it serves; empty: its engine type's default

    @property
    def serves(self) -> frozenset[str]:
        """The endpoints it serves (``nodes.rules.node_endpoints``)."""
        return rules.node_endpoints(self.engine_type, tuple(self.endpoints))


@dataclass(frozen=True, slots=True)
class PolicyView:
    model: str = ""
    strategy: str = Strategy.ROUND_ROBIN
    serving_mode: str = ServingMode.AUTO
    retry_budget: int = 2
    connect_timeout: float = 2.0
    first_token_timeout: float = 120.0
    total_timeout: float = 1800.0
    prefix_min_match: int = 32
    prefix_load_factor: float = 2.0
    panic_threshold: float = 0.5  # nodes.rules.in_panic


@dataclass(frozen=True, slots=True)
class Target:
    """A node together with the model name it serves for a route (written into ``model`` upstream)."""

    node: NodeView
    served_name: str


@dataclass(frozen=True, slots=True)
class RoleMembers:
    """All of a route's targets of one role (routable or not), with their node ids, states and
    database health side by side: what ``rotate`` reads, without walking the targets each time."""

    targets: tuple[Target, ...]
    ids: tuple[int, ...]
    states: tuple[str, ...]
    seeds: tuple[str, ...]

    @classmethod
    def of(cls, targets: tuple[Target, ...]) -> RoleMembers:
        nodes = [t.node for t in targets]
        return cls(targets, tuple(n.id for n in nodes), tuple(n.state for n in nodes), tuple(n.health for n in nodes))


@dataclass(frozen=True, slots=True)
class Route:
    """Everything a client's model name resolves to."""

    name: str
    policy: PolicyView
    targets: tuple[Target, ...]  # every node, routable or not (for 503 vs 404)
    hybrid: tuple[Target, ...]  # hybrid nodes in rotation (``nodes.rules.rotation``)
    prefill: tuple[Target, ...]  # prefill nodes in rotation
    decode: tuple[Target, ...]  # decode nodes in rotation
    served_names: frozenset[str]
    mode: str  # how the route is served now, pd or hybrid (``nodes.rules.serving_mode``)
    panic: tuple[str, ...] = ()  # roles below the panic threshold, routing to all their candidates
    # The route narrowed to the hybrid nodes that serve an endpoint beyond chat and completions
    # (``proxy.surface``), for each endpoint one of its hybrid nodes serves, routable or not.
    surface: Mapping[str, Route] = field(default_factory=dict)
    members: Mapping[str, RoleMembers] = field(default_factory=dict)  # role -> all its targets (``rotate``)

    @property
    def servable(self) -> bool:
        return bool(self.hybrid) or (bool(self.prefill) and bool(self.decode))

    def by_role(self, role: str) -> tuple[Target, ...]:
        if role == ROLE_PREFILL:
            return self.prefill
        if role == ROLE_DECODE:
            return self.decode
        return self.hybrid


@dataclass(frozen=True, slots=True)
class KeyView:
    id: int
    name: str
    allowed_models: frozenset[str]  # empty = every model
    rate_limit_rpm: int | None = None
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None  # token budgets (``proxy.budgets``); None = none
    tokens_per_day: int | None = None

    def allows(self, route: Route) -> bool:
        if not self.allowed_models:
            return True
        return route.name in self.allowed_models or not self.allowed_models.isdisjoint(route.served_names)


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    built_at: float
    nodes: dict[int, NodeView]
    routes: dict[str, Route]
    keys: dict[str, KeyView]  # by key hash
    default_policy: PolicyView
    models: tuple[str, ...]  # names listed by /v1/models (servable only), sorted
    health: Mapping[int, str] = field(default_factory=dict)  # node id -> the health the routes reflect
    node_routes: Mapping[int, tuple[str, ...]] = field(default_factory=dict)  # node id -> its routes' names

    def health_of(self, node: NodeView) -> str:
        return self.health.get(node.id, node.health)

    def key_for(self, token: bytes) -> KeyView | None:
        """The key a client presented (``Authorization: Bearer <token>``), found by its hash."""
        digest = _DIGESTS.get(token)
        if digest is not None:
            return self.keys.get(digest)
        try:
            digest = hash_api_key(token.decode())
        except UnicodeDecodeError:  # no key's hash is of bytes that are not UTF-8
            return None
        key = self.keys.get(digest)
        if key is not None and len(token) <= _DIGESTED_KEY_MAX:
            if len(_DIGESTS) >= _DIGESTS_MAX:
                _DIGESTS.clear()
            _DIGESTS[token] = digest
        return key

    def models_body(self, key: KeyView | None) -> bytes:
        names = self.models if key is None else tuple(n for n in self.models if key.allows(self.routes[n]))
        created = int(self.built_at)
        data = [{"id": n, "object": "model", "created": created, "owned_by": "routerpanel"} for n in names]
        return json.dumps({"object": "list", "data": data}).encode()


# The digests of the keys clients presented lately that matched a key (a client sends its key with
# every request): SHA-256 and its hex cost 5 k instructions a request, a lookup next to nothing. Only
# keys that matched, so a flood of wrong ones evicts nothing, and only short ones, so the memo stays
# small; it holds digests, not verdicts: a key deleted or disabled is refused on its next request.
_DIGESTS: dict[bytes, str] = {}
_DIGESTS_MAX = 1024
_DIGESTED_KEY_MAX = 256  # bytes

EMPTY = Snapshot(version=-1, built_at=0.0, nodes={}, routes={}, keys={}, default_policy=PolicyView(), models=())

_NODE_FIELDS = list(NodeView.__dataclass_fields__)
_POLICY_FIELDS = [f for f in PolicyView.__dataclass_fields__ if f != "model"]


_ROLES = (NodeRole.HYBRID.value, NodeRole.PREFILL.value, NodeRole.DECODE.value)


def rotate(route: Route, health: Mapping[int, str]) -> Route:
    """``route`` with its serving mode, its nodes in rotation per role and its panic roles
    recomputed for ``health`` (node id -> health; a node it does not mention keeps the database's).
    The mode follows the routable nodes; the roles it needs route in panic below their threshold
    (``nodes.rules.rotation``)."""
    members = route.members or {
        role: RoleMembers.of(tuple(t for t in route.targets if t.node.role == role)) for role in _ROLES
    }
    threshold = route.policy.panic_threshold
    get = health.get
    rotations = {
        role: rules.rotation(
            [
                (state, get(node_id, seed))
                for node_id, state, seed in zip(group.ids, group.states, group.seeds, strict=True)
            ],
            threshold,
        )
        for role, group in members.items()
    }
    mode = rules.serving_mode(
        route.policy.serving_mode,
        routable={role: result.routable for role, result in rotations.items()},
        has_split_nodes=bool(members[NodeRole.PREFILL].targets or members[NodeRole.DECODE].targets),
    )
    needed = rules.needed_roles(mode)
    chosen: dict[str, tuple[Target, ...]] = {}
    for role, result in rotations.items():
        group = members[role].targets
        indices = result.members
        if result.panic and role not in needed:  # a role the mode does not use keeps its healthy nodes only
            indices = rules.rotation([(t.node.state, get(t.node.id, t.node.health)) for t in group], 0.0).members
        chosen[role] = tuple([group[i] for i in indices])
    rotated = replace(
        route,
        hybrid=chosen[NodeRole.HYBRID],
        prefill=chosen[NodeRole.PREFILL],
        decode=chosen[NodeRole.DECODE],
        mode=mode,
        panic=tuple(role for role in needed if rotations[role].panic),
        members=members,
    )
    return replace(rotated, surface=_surface(rotated, health))


def index_routes(routes: Mapping[str, Route]) -> dict[int, tuple[str, ...]]:
    """Node id -> the names of the routes it is a target of."""
    index: dict[int, list[str]] = defaultdict(list)
    for name, route in routes.items():
        for target in route.targets:
            index[target.node.id].append(name)
    return {node_id: tuple(names) for node_id, names in index.items()}


def with_health(snapshot: Snapshot, live: Mapping[int, str]) -> Snapshot:
    """``snapshot`` routing by the ``live`` health states (node id -> state; nodes it does not
    mention fall back to the database's health). Only the routes of nodes whose health changed
    are recomputed; with no change the snapshot itself is returned."""
    nodes = snapshot.nodes
    effective = {node_id: live.get(node_id, node.health) for node_id, node in nodes.items()}
    before = snapshot.health or {node_id: node.health for node_id, node in nodes.items()}
    changed = [node_id for node_id, health in effective.items() if before.get(node_id) != health]
    if not changed and snapshot.health:
        return snapshot
    index = snapshot.node_routes or index_routes(snapshot.routes)
    routes = dict(snapshot.routes)
    for name in {name for node_id in changed for name in index.get(node_id, ())}:
        routes[name] = rotate(routes[name], effective)
    return replace(
        snapshot,
        routes=routes,
        models=tuple(sorted(name for name, route in routes.items() if route.servable)),
        health=effective,
        node_routes=index,
    )


def build_routes(
    nodes: dict[int, NodeView],
    aliases: Sequence[tuple[int | None, str, str]],
    policies: dict[str, PolicyView],
    default_policy: PolicyView,
) -> dict[str, Route]:
    """Resolve aliases to routes. ``aliases`` holds ``(node_id or None, name, served_name)`` rows.

    A node's own rows map a name to that node; a row without a node (an operator's global alias)
    maps the name to every node that serves ``served_name``. A served name always resolves to the
    nodes serving it, even without an explicit row. A node's own row wins over a global alias.
    """
    targets: dict[str, dict[int, Target]] = defaultdict(dict)
    # Served name -> the nodes serving it, in order: a dict, not a list, so that checking for a node
    # already there stays O(1) (with a list, a model served by 5,000 nodes took 0.4 s to build).
    serving: dict[str, dict[int, None]] = defaultdict(dict)
    for node_id, name, served in aliases:
        if node_id is None or node_id not in nodes:
            continue
        targets[name][node_id] = Target(nodes[node_id], served)
        serving[served].setdefault(node_id, None)
    for served, node_ids in serving.items():
        for node_id in node_ids:
            targets[served].setdefault(node_id, Target(nodes[node_id], served))
    for node_id, name, served in aliases:
        if node_id is None:
            for serving_id in serving.get(served, ()):
                targets[name].setdefault(serving_id, Target(nodes[serving_id], served))

    routes: dict[str, Route] = {}
    for name, by_node in targets.items():
        ordered = tuple(sorted(by_node.values(), key=lambda t: t.node.url))
        served_names = frozenset(t.served_name for t in ordered)
        # Policies are keyed by served name; an alias spanning several served names uses its own
        # name's policy if there is one, else the first served name's.
        candidates = [name, *sorted(served_names)] if len(served_names) > 1 else sorted(served_names)
        policy = next((policies[s] for s in candidates if s in policies), default_policy)
        unrouted = Route(name, policy, ordered, (), (), (), served_names, ServingMode.HYBRID.value)
        routes[name] = rotate(unrouted, {})
    return routes


def _surface(route: Route, health: Mapping[int, str]) -> dict[str, Route]:
    """``Route.surface``: per endpoint, the route with only the hybrid nodes that serve it (those
    endpoints have no PD split: docs/architecture.md), routable by ``health`` as in ``rotate``."""
    serving: dict[str, list[Target]] = defaultdict(list)
    for target in route.targets:
        if target.node.role == NodeRole.HYBRID:
            for endpoint in target.node.serves:
                serving[endpoint].append(target)
    surface: dict[str, Route] = {}
    for endpoint, targets in serving.items():
        hybrid = tuple(t for t in targets if rules.is_routable(t.node.state, health.get(t.node.id, t.node.health)))
        surface[endpoint] = replace(
            route, targets=tuple(targets), hybrid=hybrid, prefill=(), decode=(), mode=ServingMode.HYBRID.value
        )
    return surface


def build_snapshot() -> Snapshot:
    """Read the registry and return a fresh snapshot. Blocking: call it from a worker thread."""
    version = ConfigVersion.objects.filter(pk=1).values_list("version", flat=True).first() or 0
    nodes = {
        row["id"]: NodeView(**{**row, "endpoints": frozenset(row["endpoints"] or ())})
        for row in Node.objects.values(*_NODE_FIELDS)
    }
    aliases = list(ModelAlias.objects.values_list("node_id", "name", "served_name"))
    policies: dict[str, PolicyView] = {}
    panic_default = settings.ROUTERPANEL_HEALTH_PANIC_THRESHOLD
    default_policy = PolicyView(panic_threshold=panic_default)
    for row in RoutePolicy.objects.filter(enabled=True).values("model", *_POLICY_FIELDS):
        if row["panic_threshold"] is None:
            row["panic_threshold"] = panic_default
        view = PolicyView(**row)
        if row["model"] == "":
            default_policy = view
        else:
            policies[row["model"]] = view
    keys = {
        row["key_hash"]: KeyView(
            id=row["id"],
            name=row["name"],
            allowed_models=frozenset(row["allowed_models"] or ()),
            rate_limit_rpm=row["rate_limit_rpm"],
            max_concurrent=rules.concurrency_limit(row["max_concurrent"]),
            tokens_per_minute=row["tokens_per_minute"],
            tokens_per_day=row["tokens_per_day"],
        )
        for row in ApiKey.objects.filter(is_active=True).values(
            "id",
            "name",
            "key_hash",
            "allowed_models",
            "rate_limit_rpm",
            "max_concurrent",
            "tokens_per_minute",
            "tokens_per_day",
        )
    }
    routes = build_routes(nodes, aliases, policies, default_policy)
    return Snapshot(
        version=version,
        built_at=time.time(),
        nodes=nodes,
        routes=routes,
        keys=keys,
        default_policy=default_policy,
        models=tuple(sorted(name for name, route in routes.items() if route.servable)),
        health={node_id: node.health for node_id, node in nodes.items()},
        node_routes=index_routes(routes),
    )


def read_version() -> int:
    """The configuration version stored in the database (blocking; the watcher's fallback poll)."""
    return ConfigVersion.objects.filter(pk=1).values_list("version", flat=True).first() or 0


_current: Snapshot = EMPTY


def current() -> Snapshot:
    return _current


def install(snapshot: Snapshot) -> None:
    """Make ``snapshot`` the routing table of this process (one atomic reference swap)."""
    global _current
    _current = snapshot
