"""Request explanations on the data path: what the router and the attempt loop decided for one
request, kept cheaply while it runs and flushed to Redis by the worker's background loop.

The hot path only appends what is already at hand (docs/architecture.md, "Request explanations"):

- ``Router.choose`` hands over the nodes its filter leaves out by reason, naming a few per reason
  and counting the rest, found among the few nodes that can be left out (already tried, at a
  concurrency limit, behind a breaker: ``Router.left_out``) rather than by walking the route, which
  may have a thousand nodes. The nodes out of rotation (draining, disabled, unhealthy...) are the
  snapshot's, so they are worked out off the hot path, once per route (``_route_excluded``).
- Only the pick and the next ``LISTED_CANDIDATES - 1`` available nodes after it in route order get
  their figures read (in flight, weight, latency, prefix match), into one flat tuple per choice.
- The attempt loop adds one tuple per attempt; the answer's usage is a slice of bytes already read.
- Those tuples hold plain values only (ids, URLs, numbers, strings: never a node or an enum), so the
  garbage collector stops tracking them at its first pass, and they are already in the wire layout
  (``nodes.live.explain``): the record is dumped as it is.

``Explainer.finish``, once the answer went out, dumps the finished record as JSON and appends the
bytes to an in-memory buffer (bounded: when Redis has been away long enough to fill it, records are
dropped and counted, and the request never notices). Encoding it then rather than at the flush is what
keeps the records cheap: a record waiting as objects (the ``Explanation`` and its tuples, about six
per request) was most of what the garbage collector's young passes found alive under load, and made
them run several times as often; bytes and strings are nothing it tracks, and the record's objects
are freed with the request.
``Explainer.flush``, called by ``proxy.shared.SharedCounters``'s loop, appends a batch to the
stream in one call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from prometheus_client import Counter

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

from .snapshot import KeyView, NodeView, Route, Target

if TYPE_CHECKING:
    from .attempts import Attempt
    from .errors import ProxyError
    from .request import Outcome
    from .router import Router
    from .strategies import Ok, Table

    # A pick ``settle`` records: the router, the role, the nodes of the role in rotation, their
    # table, the nodes already tried at the pick, the filter, the pick and its prefix match.
    PendingChoice = tuple[Router, str, int, Table, Collection[int], Ok, Target, tuple[int, int] | None]

logger = logging.getLogger(__name__)

HEADER = b"x-routerpanel-explain"

DROPPED = Counter(
    "routerpanel_explain_dropped",
    "Request explanations dropped: the buffer was full, Redis failed, or the record could not be packed.",
    ["why"],
)
STORED = Counter("routerpanel_explain_stored", "Request explanations appended to Redis.")


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


class Explainer:
    """This worker's explanations: starts them, buffers the finished ones, flushes them to Redis."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        retention: float = 3600.0,
        max_records: int = 50_000,
        buffer_size: int = 10_000,
        flush_interval: float = 1.0,
        batch: int = 500,
    ) -> None:
        self.enabled = enabled
        self.retention = retention
        self.max_records = max_records
        self.buffer_size = buffer_size
        self.flush_interval = flush_interval
        self.batch = batch
        self.buffer: list[bytes] = []  # packed records waiting for the flush (``finish``)
        self.ids: list[str] = []  # their request ids, in the same order
        self.dropped = 0  # records lost: the buffer was full (Redis away) or a flush failed
        self.stored = 0
        self._flushed_at = 0.0

    def begin(
        self, request_id: str, key: KeyView | None, model: str, path: str, stream: bool, started: float, header: bool
    ) -> Explanation | None:
        """An explanation for a request, or None when explanations are off and the client did not
        ask for the summary."""
        if not (self.enabled or header):
            return None
        return Explanation(request_id, key, model, path, stream, started, header)

    def refused(self, explanation: Explanation, exc: ProxyError) -> None:
        """The request was refused before any node was chosen (unknown model, the key's limits):
        finish its record, and add the summary to the error's headers if the client asked."""
        explanation.status, explanation.error = exc.status, exc.code
        explanation.not_allowed = exc.code == "model_not_allowed"
        exc.headers += explanation.failed(exc)
        self.finish(explanation, None)

    def finish(self, explanation: Explanation, outcome: Outcome | None) -> None:
        """The request ended (``outcome`` None: refused before it was sent anywhere): note how, and
        buffer the record for the next flush."""
        explanation.total = time.perf_counter() - explanation.started
        if outcome is not None:
            explanation.status, explanation.error = outcome.status, outcome.error
            if outcome.node != "-":
                explanation.answered_by = outcome.node
            if outcome.usage:
                explanation.usage = live.usage_slice(outcome.usage)
        if not self.enabled:
            return
        if len(self.buffer) >= self.buffer_size:
            self.dropped += 1
            DROPPED.labels("buffer_full").inc()
            return
        try:
            record = live.encode(explanation.wire())
        except Exception:  # a record this code cannot pack costs the record, never the request
            logger.debug("could not pack the explanation of %s", explanation.request_id, exc_info=True)
            self.dropped += 1
            DROPPED.labels("unpackable").inc()
            return
        self.ids.append(explanation.request_id)
        self.buffer.append(record)

    def due(self, now: float | None = None) -> bool:
        """Whether the loop should flush now: a full batch waits, or the interval passed.

        Batches are small (``batch``, 500) and the loop flushes every full one at each of its ticks:
        what a flush holds at once (the records, their wire form, the packed argument) is the web
        worker's peak memory, and 2,000 records at a time added about 2 MB to it under load."""
        if not self.buffer:
            return False
        now = time.monotonic() if now is None else now
        return len(self.buffer) >= self.batch or now - self._flushed_at >= self.flush_interval

    async def flush(self, client: aioredis.Redis) -> int:
        """Append up to one batch to the stream; returns how many. A failure drops (and counts) the
        batch and raises, so the loop backs off as for any Redis error."""
        batch, self.buffer = self.buffer[: self.batch], self.buffer[self.batch :]
        ids, self.ids = self.ids[: self.batch], self.ids[self.batch :]
        self._flushed_at = time.monotonic()
        records = list(zip(ids, batch, strict=True))
        oldest_ms = int((time.time() - self.retention) * 1000)
        try:
            await client.eval(*live.append_args(records, max_records=self.max_records, oldest_ms=oldest_ms))
        except BaseException:
            self.dropped += len(batch)
            DROPPED.labels("redis").inc(len(batch))
            raise
        self.stored += len(batch)
        STORED.inc(len(batch))
        return len(batch)
