"""One request's explanation while it runs (``Explanation``), and the snapshot's exclusions per
route that its record names (``proxy.explain`` describes what is kept and why it is cheap)."""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from nodes.choices import ExclusionReason, NodeRole, NodeState, ServingMode
from nodes.live import explain as live
from nodes.live.explain import (
    CHOICE_HEAD,
    NAMED_PER_REASON,
    WireAttempt,
    WireChoice,
    WireExcluded,
    WireExclusion,
    WireRecord,
)

from ..snapshot import KeyView, NodeView, Route, Target

if TYPE_CHECKING:
    from ..attempts import Attempt
    from ..errors import ProxyError
    from ..router import Router
    from ..strategies import Ok, Table

    # A pick ``settle`` records: the router, the role, the nodes of the role in rotation, their
    # table, the nodes already tried at the pick, the filter, the pick and its prefix match.
    PendingChoice = tuple[Router, str, int, Table, Collection[int], Ok, Target, tuple[int, int] | None]

HEADER = b"x-routerpanel-explain"


class Explanation:
    """One request's decision record while it runs (see the module doc)."""

    __slots__ = (
        "answered_by",
        "at",
        "attempts",
        "choices",
        "error",
        "header",
        "key",
        "message",
        "model",
        "not_allowed",
        "path",
        "pending",
        "request_id",
        "route",
        "started",
        "status",
        "stream",
        "total",
        "usage",
    )

    def __init__(
        self, request_id: str, key: KeyView | None, model: str, path: str, stream: bool, started: float, header: bool
    ) -> None:
        self.request_id = request_id
        self.key = key
        self.model = model
        self.path = path
        self.stream = stream
        self.started = started  # perf_counter when the request arrived
        self.at = time.time()
        self.header = header  # the client asked for the one-line summary
        self.route: Route | None = None
        # Tuples, not lists: a tuple of plain tuples leaves the garbage collector's care (see WireChoice).
        self.choices: tuple[WireChoice, ...] = ()
        self.attempts: tuple[WireAttempt, ...] = ()
        self.not_allowed = False  # the key may not use the model: every node of the route was out
        self.status = 0
        self.error: str | None = None
        self.message: str | None = None
        self.total = 0.0
        self.usage = b""
        self.answered_by: str | None = None  # the URL of the node whose answer the client got
        self.pending: PendingChoice | None = None  # a pick whose figures ``settle`` records

    # -- Recording (hot path) ------------------------------------------------------------------

    def settle(self) -> None:
        """Record the pick ``Router.choose`` left ``pending``, if any (``picked``).

        On a quiet loop the hybrid path leaves its pick pending (``choose``'s ``defer``) and settles
        it once the request to its node is written (``proxy.httpclient.Pool.request``'s ``sent``; or
        before a wait for a connection): the engine already works while the figures are read, and
        nothing else has run on the loop since the pick, so they are the ones the router read. A
        later pick, the attempt's end and any reader of the record settle it first."""
        pending = self.pending
        if pending is not None:
            self.pending = None
            router, role, in_rotation, table, exclude, ok, chosen, prefix = pending
            self.picked(router, role, in_rotation, table, exclude, ok, chosen, prefix)

    def picked(
        self,
        router: Router,
        role: str,
        in_rotation: int,
        table: Table,
        exclude: Collection[int],
        ok: Ok,
        chosen: Target,
        prefix: tuple[int, int] | None,
    ) -> None:
        """``Router.choose`` took the slot on ``chosen``: record the decision with the figures as
        they were when it chose (the pick's own new request is not counted, and the pick, which the
        filter let through, is not among the nodes left out, whatever taking its slot changed).
        Called at once, or by ``settle`` before anything else ran on the loop."""
        excluded = router.left_out(table, exclude, ok, taken=chosen.node.id)
        self.chose(router, role, in_rotation, excluded, router.listed(table, chosen, ok), prefix, taken=True)

    def chose(
        self,
        router: Router,
        role: str,
        in_rotation: int,
        excluded: WireExcluded,
        listed: Sequence[Target],
        prefix: tuple[int, int] | None = None,
        *,
        taken: bool = False,
    ) -> None:
        """``Router.choose``'s decision: of ``in_rotation`` nodes of ``role``, those its filter left
        out (``Router.left_out``: reason -> [count, the first few (id, URL)], None: none), and the pick
        followed by a few more candidates (``listed``; empty: no pick). ``taken``: the pick's slot is
        already taken, and its own request is not among its requests in flight."""
        available = in_rotation - sum(entry[0] for entry in excluded.values()) if excluded else in_rotation
        if not listed:
            self.choices = (*self.choices, (str(role), in_rotation, available, None, excluded))
            return
        load = router.load
        chosen = listed[0]
        # The node's role is the same text as ``role`` but a plain string (``role`` may be a NodeRole,
        # which the garbage collector tracks).
        choice: WireChoice = (chosen.node.role, in_rotation, available, chosen.served_name, excluded)
        own = 1 if taken else 0  # the pick's own slot, for the first in the list only
        for target in listed:
            node = target.node
            node_id = node.id
            match = prefix[1] if prefix is not None and prefix[0] == node_id else None
            choice += (node_id, node.url, load.inflight(node_id) - own, node.weight, load.latency(node_id), match)
            own = 0
        self.choices = (*self.choices, choice)

    def attempted(self, attempt: Attempt, duration: float) -> None:
        """One attempt of the attempt loop, after it settled, already in its wire layout."""
        node = attempt.target.node
        error = attempt.error.code if attempt.error is not None else ("cancelled" if attempt.cancelled else None)
        began = attempt.started - self.started
        step = (node.role, node.id, node.url, began, duration, attempt.status, error, attempt.ttft, attempt.verdict)
        self.attempts = (*self.attempts, step)

    def failed(self, exc: ProxyError) -> list[tuple[bytes, bytes]]:
        """The proxy answers ``exc``: keep its message; the summary header if the client asked."""
        self.message = exc.message
        return [(HEADER, self.summary())] if self.header else []

    # -- The one-line summary (x-routerpanel-explain) -------------------------------------------

    def summary(self) -> bytes:
        """What is known now in one header line: strategy, pick, candidates, exclusions, retries."""
        if self.pending is not None:
            self.settle()
        route = self.route
        last: dict[str, WireChoice] = {}  # per role, the latest choice that picked a node (else the latest)
        for choice in self.choices:
            if choice[3] is not None or choice[0] not in last or last[choice[0]][3] is None:
                last[choice[0]] = choice
        pd = route is not None and route.mode == ServingMode.PD
        url = CHOICE_HEAD + 1  # the pick's URL
        picks = [
            f"{role} {choice[url]}" if pd else choice[url] for role, choice in last.items() if choice[3] is not None
        ]
        counts: dict[str, int] = {}
        for reason, count in self._exclusion_counts(last):
            counts[reason] = counts.get(reason, 0) + count
        # Each pick after a role's first is a retry, for the way the attempt before it ended (the
        # attempt being delivered has not settled yet when the headers go out).
        picked: dict[str, int] = {}
        for choice in self.choices:
            if choice[3] is not None:
                picked[choice[0]] = picked.get(choice[0], 0) + 1
        retries = []
        for role, _, _, _, _, status, error, _, _ in self.attempts:
            if picked.get(role, 0) > 1:
                picked[role] -= 1
                retries.append(error or str(status))
        parts = [
            f"strategy={route.policy.strategy if route is not None else '-'}",
            f"pick={', '.join(picks) or 'none'}",
            f"candidates={sum(choice[2] for choice in last.values())}",
            "excluded=" + (",".join(f"{reason}:{count}" for reason, count in counts.items()) or "none"),
            f"retries={len(retries)}" + (f" ({','.join(retries)})" if retries else ""),
        ]
        return "; ".join(parts).encode("latin-1", "replace")[:1024]

    def _exclusion_counts(self, last: dict[str, WireChoice]) -> list[tuple[str, int]]:
        route = self.route
        if route is None:
            return []
        counts: list[tuple[str, int]] = []
        roles: Collection[str] = last.keys()
        if self.not_allowed:
            roles = _needed_roles(route)
            counts += [(ExclusionReason.NOT_ALLOWED.value, len(route.by_role(role))) for role in roles]
        for role in roles:
            counts += [(reason, count) for reason, count, _ in _route_excluded(route).get(role, ())]
            choice = last.get(role)
            if choice is not None and choice[4]:
                counts += [(reason, entry[0]) for reason, entry in choice[4].items()]
        return counts

    # -- The wire record (off the hot path) ----------------------------------------------------

    def wire(self) -> WireRecord:
        """The record in its wire layout: mostly what the request holds already."""
        if self.pending is not None:
            self.settle()
        route = self.route
        choices = self.choices
        if self.not_allowed and route is not None:
            for role in _needed_roles(route):
                members = route.by_role(role)
                refused = {ExclusionReason.NOT_ALLOWED.value: [len(members), _refs(members)]}
                choices += ((str(role), len(members), 0, None, refused),)
        policy = route.policy if route is not None else None
        return (
            live.VERSION,
            self.request_id,
            self.at,
            self.key.name if self.key is not None else None,
            self.model,
            self.path,
            self.stream,
            route.mode if route is not None else None,
            policy.model if policy is not None else None,
            policy.strategy if policy is not None else None,
            choices,
            self.attempts,
            self.total,
            self.status,
            self.error,
            self.message,
            self.usage.decode("latin-1"),
            self.answered_by,
            _route_excluded(route) if route is not None else None,
        )


def _refs(nodes: Sequence[NodeView] | Sequence[Target]) -> list[tuple[int, str]]:
    refs = []
    for item in nodes[:NAMED_PER_REASON]:
        node = item.node if isinstance(item, Target) else item
        refs.append((node.id, node.url))
    return refs


def _needed_roles(route: Route) -> tuple[str, ...]:
    return (NodeRole.PREFILL, NodeRole.DECODE) if route.mode == ServingMode.PD else (NodeRole.HYBRID,)


# The snapshot's exclusions per route, worked out once: routes are immutable, and the cache holds
# each route it describes, so an id is never reused while its entry lives.
_ROUTE_CACHE_MAX = 4096
_route_cache: dict[int, tuple[Route, dict[str, list[WireExclusion]]]] = {}


def _route_excluded(route: Route) -> dict[str, list[WireExclusion]]:
    """Per role, the nodes serving ``route`` that are out of rotation, by reason: their state when
    it is not active, else their health (``nodes.rules.is_routable``). Roles with none are absent."""
    cached = _route_cache.get(id(route))
    if cached is not None and cached[0] is route:
        return cached[1]
    result: dict[str, list[WireExclusion]] = {}
    for role in {target.node.role for target in route.targets}:
        in_rotation = {target.node.id for target in route.by_role(role)}
        grouped: dict[str, list[NodeView]] = {}
        for target in route.targets:
            node = target.node
            if node.role == role and node.id not in in_rotation:
                reason = node.state if node.state != NodeState.ACTIVE else ExclusionReason.UNHEALTHY.value
                grouped.setdefault(str(reason), []).append(node)
        if grouped:
            result[str(role)] = [(reason, len(nodes), _refs(nodes)) for reason, nodes in grouped.items()]
    if len(_route_cache) >= _ROUTE_CACHE_MAX:
        _route_cache.clear()
    _route_cache[id(route)] = (route, result)
    return result
