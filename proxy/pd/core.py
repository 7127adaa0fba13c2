"""The PD request: its prefill/decode pair, the legs' types, and the answers the prefill gives.

A ``PdRequest`` holds one client request's pair of nodes. The engine protocols (``proxy.pd.engines``)
say what each leg sends; ``proxy.pd.legs`` runs the legs through the attempt loop; ``proxy.pd.flows``
sequences them; ``proxy.pd.cleanup`` keeps the clean-up that must outlive a client disconnect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from nodes.choices import EngineType

from ..errors import ProxyError
from ..request import JSON_ERRORS, Outcome, ProxyRequest, parse_json, with_members
from ..request import json_bytes as dumps
from ..router import Router
from ..snapshot import MODE_PD, ROLE_DECODE, ROLE_PREFILL, NodeView, Route, Target
from ..transport import DisconnectWatcher, Send
from ..upstream import engines

_inflight = 0
_rank_ticks: dict[int, int] = {}
_VLLM = EngineType.VLLM  # looked up once, as ``proxy.snapshot.ROLE_*`` are


def inflight() -> int:
    """PD requests being orchestrated now (a gauge)."""
    return _inflight


def started() -> None:
    global _inflight
    _inflight += 1


def ended() -> None:
    global _inflight
    _inflight -= 1


def wants_pd(route: Route) -> bool:
    """Whether a request for ``route`` goes the PD way: its serving mode, decided when the snapshot
    was built by the one rule, ``nodes.rules.serving_mode``."""
    return route.mode == MODE_PD


def host_port(node: NodeView) -> tuple[str, int]:
    parts = urlsplit(node.url)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)


def _rank_for(node: NodeView) -> int:
    """vLLM data-parallel nodes are ``dp_size`` logical nodes ``url@rank``: spread over the ranks
    (``PdRequest.choose_leg`` calls this for such a node only)."""
    tick = _rank_ticks.get(node.id, 0)
    _rank_ticks[node.id] = tick + 1
    return tick % node.dp_size


@dataclass(slots=True)
class Leg:
    """The node one leg of a PD request runs on (a vLLM data-parallel node: one of its ranks)."""

    role: str
    target: Target
    rank: int | None = None

    @property
    def url(self) -> str:
        return self.target.node.url

    @property
    def label(self) -> str:
        return self.url if self.rank is None else f"{self.url}@{self.rank}"

    def headers(self, request_id: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        if self.rank is not None:
            headers["X-data-parallel-rank"] = str(self.rank)
        return headers


@dataclass(slots=True)
class LegAnswer:
    """A leg's complete JSON answer (any status)."""

    leg: Leg
    status: int
    body: bytes
    content_type: str
    data: dict[str, Any] | None

    @classmethod
    def parse(cls, leg: Leg, status: int, body: bytes, content_type: str) -> LegAnswer:
        """The answer with its JSON object parsed (``data`` None when it is not one)."""
        data = None
        if content_type == "application/json" or body[:1] == b"{":
            try:  # not contextlib.suppress: three calls per leg
                parsed = parse_json(body)
            except JSON_ERRORS:
                pass
            else:
                data = parsed if isinstance(parsed, dict) else None
        return cls(leg, status, body, content_type or "application/json", data)

    def message(self) -> str:
        """The engine's error message: nested ``{"error": {"message"}}`` (vLLM, NanoDeploy) or flat
        ``{"message"}`` (SGLang, LMDeploy >= 0.16); else the start of the body."""
        data = self.data or {}
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(data.get("message"), str):
            return data["message"]
        return self.body[:300].decode(errors="replace")


_JSON = {"Content-Type": "application/json"}


class Constant:
    """Members a leg adds to every request's JSON and those it drops (``PdRequest.body_with``),
    with the added members' encoding."""

    __slots__ = ("drop", "keys", "members", "values")

    def __init__(self, values: dict[str, Any], drop: tuple[str, ...] = ()) -> None:
        self.values = values
        self.drop = drop
        self.keys = (*values, *drop)  # the client sent none of these: the encoding can be spliced in
        self.members = dumps(values)[1:-1]


# A leg request: (path, JSON body, headers) for the node a leg was given; the body as a dict, or
# already encoded (``PdRequest.body_for``).
LegRequest = tuple[str, dict[str, Any] | bytes, dict[str, str]]


def _same(current: Any, value: Any) -> bool:
    """Whether the client already sent ``value`` (``true`` is not ``1`` here, as to an engine)."""
    return current is value or (type(current) is type(value) and current == value)


class PdRequest:
    def __init__(
        self, request: ProxyRequest, send: Send, router: Router, watcher: DisconnectWatcher, outcome: Outcome
    ) -> None:
        self.request = request
        self.route = request.route
        self.policy = request.route.policy
        self.send = send
        self.router = router
        self.watcher = watcher
        self.outcome = outcome
        self.prefill: Leg | None = None
        self.decode: Leg | None = None
        self._decode_held = False
        self.decode_status = 0  # the last decode engine's HTTP status (0: none answered)
        self.decode_completed = False  # the decode's answer reached the client in full
        self.prompt_tokens: int | None = None  # from the prefill, merged into the decode's usage
        self.left_during_prefill = False  # the client left while the (shielded) prefill ran
        self.prefill_timeout = min(self.policy.first_token_timeout, self.policy.total_timeout)

    # -- Pair selection ------------------------------------------------------------------------

    def choose_leg(self, role: str, exclude: list[int]) -> Leg | None:
        """A node of ``role`` not in ``exclude``, with the route's strategy (its slot acquired)."""
        request = self.request
        target = self.router.choose(
            self.route,
            role,
            exclude=exclude,
            headers=request.headers.routing,
            payload=request.payload,
            explain=request.explain,
        )
        if target is None:
            return None
        node = target.node
        # Only a vLLM data-parallel node has ranks: the test here, a call less for every other node.
        return Leg(role, target, _rank_for(node) if node.dp_size > 1 and node.engine_type == _VLLM else None)

    def missing(self, role: str) -> ProxyError:
        name = self.route.name
        if not self.route.by_role(role):
            return ProxyError(
                503,
                f"No routable {role} node serves {name!r} right now (PD serving needs a prefill and a decode node).",
                f"no_{role}_node",
            )
        return ProxyError(
            503,
            f"Every {role} node serving {name!r} is at its concurrency limit or out of rotation after failures.",
            f"no_{role}_capacity",
        )

    def choose_pair(self, avoid_prefill: list[int] | None = None, avoid_decode: list[int] | None = None) -> None:
        """Pick a prefill and a decode node, each role with its own strategy counters; 503 naming the
        missing role. Both slots are held from here: the prefill's until its leg runs, the decode's
        until ``take_decode`` (its leg) or ``release_unused``. Nodes in ``avoid_*`` (a pair that just
        failed) are taken only when no other node of that role is left."""
        self.decode_status, self.decode_completed = 0, False
        prefill = self._choose_avoiding(ROLE_PREFILL, avoid_prefill)
        if prefill is None:
            if not self.route.by_role(ROLE_DECODE):
                raise ProxyError(
                    503,
                    f"No routable prefill or decode node serves {self.route.name!r} right now.",
                    "no_prefill_node",
                )
            raise self.missing(ROLE_PREFILL)
        decode = self._choose_avoiding(ROLE_DECODE, avoid_decode)
        if decode is None:
            self.router.release(prefill.target)
            raise self.missing(ROLE_DECODE)
        self.prefill, self.decode, self._decode_held = prefill, decode, True

    def _choose_avoiding(self, role: str, avoid: list[int] | None) -> Leg | None:
        leg = self.choose_leg(role, avoid) if avoid else None
        return leg if leg is not None else self.choose_leg(role, [])

    def take_decode(self) -> Leg:
        """The decode leg's node, whose slot its leg releases from now on."""
        assert self.decode is not None
        self._decode_held = False
        return self.decode

    def release_unused(self) -> None:
        if self._decode_held and self.decode is not None:
            self._decode_held = False
            self.router.release(self.decode.target)

    # -- Helpers -------------------------------------------------------------------------------

    def payload_for(self, leg: Leg, *, drop: tuple[str, ...] = (), **changes: Any) -> dict[str, Any]:
        """The client's JSON for ``leg``: ``model`` rewritten, ``drop`` removed, ``changes`` set."""
        payload = {k: v for k, v in self.request.payload.items() if k not in drop}
        payload["model"] = leg.target.served_name
        payload.update(changes)
        return payload

    def body_for(self, leg: Leg, *, drop: tuple[str, ...] = (), **changes: Any) -> bytes:
        """``payload_for`` as the bytes to send. When the client's JSON holds none of ``drop`` and
        none of ``changes`` (or already the same value), its own bytes (``model`` rewritten,
        ``ProxyRequest.body_for``) with the changes appended before the closing brace: only what is
        added is encoded. Otherwise the whole changed JSON is encoded."""
        payload = self.request.payload
        added: dict[str, Any] = {}
        for key, value in changes.items():  # plain loops: cheaper than generators on this path
            if key not in payload:
                added[key] = value
            elif not _same(payload[key], value):
                return dumps(self.payload_for(leg, drop=drop, **changes))
        for key in drop:
            if key in payload:
                return dumps(self.payload_for(leg, drop=drop, **changes))
        body = self.request.body_for(leg.target.served_name)
        if not added:
            return body
        return with_members(body, dumps(added)[1:-1])

    def body_with(self, leg: Leg, changes: Constant) -> bytes:
        """``body_for(leg, drop=changes.drop, **changes.values)`` for changes that are the same for
        every request: when the client's JSON holds none of their keys and none of those dropped,
        their encoding made once is spliced in (a microsecond less than encoding them again)."""
        payload = self.request.payload
        for key in changes.keys:
            if key in payload:
                return self.body_for(leg, drop=changes.drop, **changes.values)
        return with_members(self.request.body_for(leg.target.served_name), changes.members)

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        assert self.prefill is not None and self.decode is not None
        return self.request.response_headers(f"prefill={self.prefill.label}; decode={self.decode.label}")

    async def post_json(
        self, leg: Leg, path: str, body: dict[str, Any], headers: dict[str, str], timeout: float
    ) -> LegAnswer:
        """POST ``body`` outside the attempt loop (a KV free, an LMDeploy handshake) and read the
        whole answer within ``timeout`` seconds."""
        return await self.call_json(leg, "POST", path, body, timeout, headers)

    async def call_json(
        self,
        leg: Leg,
        method: str,
        path: str,
        body: Any,
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> LegAnswer:
        """``method`` ``path`` on the leg's node with a JSON ``body`` (None: no body), outside the
        attempt loop, through the data path's client (``proxy.httpclient``): a connection within the
        policy's connect timeout, then the whole answer within ``timeout`` seconds (and the policy's
        total timeout). Errors are the client's: aiohttp's types
        (``ClientOSError`` when the node could not be reached) or ``TimeoutError``."""
        data = None if body is None else dumps(body)
        if headers is None:
            headers = _JSON if body is not None else {}
        policy = self.policy
        # The connection's own timer bounds the answer: cheaper than an asyncio timeout around it.
        response = await engines().request(
            method,
            leg.url + path,
            data,
            headers,
            connect=policy.connect_timeout,
            total=min(timeout, policy.total_timeout),
        )
        try:
            raw = await response.read()
        finally:
            response.close()  # a body cut short (a timeout) closes its connection
        return LegAnswer.parse(leg, response.status, raw, response.content_type)
