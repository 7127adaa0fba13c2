"""The lean ASGI application for ``/v1/*``, ``/health`` and ``/metrics``.

No Django request handling runs here (it costs ~840 µs per request): this module parses,
authenticates and routes against the in-memory snapshot, then hands over to the hybrid or PD path.
``routerpanel.asgi`` mounts it in front of Django and the Channels WebSocket router.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator

from django.conf import settings
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from . import metrics
from . import snapshot as snapshots
from .breaker import Breakers
from .errors import ProxyError, bad_request
from .explain import Explainer, Explanation
from .health import LiveHealth
from .hybrid import proxy_hybrid
from .load import KeyLimiter
from .loops import check_hops, hop_value
from .pd import finish_cleanups, proxy_pd, wants_pd
from .readiness import readiness
from .request import Outcome, ProxyRequest, parse_json
from .router import Router
from .shared import SharedCounters
from .snapshot import KeyView, Route, Snapshot
from .surface import MODEL_PREFIX, PATHS, model_object, route_for
from .transport import ClientGone, DisconnectWatcher, Receive, RequestHeaders, Scope, Send, read_body, send_bytes
from .transport import send_error as _send_error
from .upstream import close_session
from .watcher import SnapshotWatcher

logger = logging.getLogger(__name__)

# Paths this app answers; everything else goes to Django.
PREFIXES = ("/v1/",)
EXACT_PATHS = frozenset(
    {"/v1", "/health", "/health/ready", "/metrics", *(p for p in PATHS if not p.startswith(PREFIXES))}
)


# Allocations between two young garbage collections (Python's default: 700). Under load the young
# generation is mostly the objects of requests still in flight, which a collection scans and promotes
# without freeing any (a request's objects are freed by reference counting when it ends): at 700 a
# PD request paid for about one young collection in fifty. docs/decisions/0004-gc-freeze.md.
GC_YOUNG_THRESHOLD = 20_000


def handles(path: str) -> bool:
    return path in EXACT_PATHS or path.startswith(PREFIXES)


class RequestIds:
    """Request ids for requests that bring none: 32 hex digits, a random half drawn once per
    process and a counter, so that every worker's ids differ from every other's and from a
    restarted worker's. A fresh ``os.urandom(16)`` per request cost a system call (~2 µs under
    load); this costs a formatting (~0.5 µs)."""

    def __init__(self) -> None:
        self.reseed()
        # A server that forks its workers after importing the app (not uvicorn's or daphne's way)
        # must not hand the same ids to two of them.
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


_new_request_id = RequestIds()


class ProxyApp:
    def __init__(
        self, *, router: Router | None = None, watcher: SnapshotWatcher | None = None, limiter: KeyLimiter | None = None
    ) -> None:
        # This worker's one loop on Redis: live statistics always; in-flight counts, key limits and
        # breakers shared by every worker too (tests that pass their own router or limiter keep them
        # local to the process).
        share = settings.ROUTERPANEL_PROXY_SHARED_COUNTERS and router is None and limiter is None
        self.shared = SharedCounters(
            settings.ROUTERPANEL_REDIS_URL,
            interval=settings.ROUTERPANEL_PROXY_SHARED_INTERVAL,
            breakers=Breakers(
                failures=settings.ROUTERPANEL_BREAKER_FAILURES, cooldown=settings.ROUTERPANEL_BREAKER_COOLDOWN
            ),
            share_counters=share,
            health=LiveHealth(apply_interval=settings.ROUTERPANEL_PROXY_HEALTH_APPLY_INTERVAL),
        )
        self.router = router or Router(
            load=self.shared.load if share else None, breakers=self.shared.breakers if share else None
        )
        self.shared.inflight = self.router.load.counts  # live per-node figures for the dashboard
        self.watcher = watcher or SnapshotWatcher()
        self.watcher.overlay = self.shared.health.overlay  # every rebuilt snapshot routes by the live health
        # This worker learns that a node turned unhealthy from the snapshots it installs, rebuilt from
        # the configuration or recomputed from the live health: requests still waiting for that node's
        # first byte are retried elsewhere (``Router.eject``).
        self.watcher.on_install = self.router.eject_unhealthy
        self.watcher.prepare = self.router.prepare
        self.shared.health.on_install = self.router.eject_unhealthy
        self.limiter = limiter or (self.shared.limiter if share else KeyLimiter())
        self.require_key = settings.ROUTERPANEL_PROXY_REQUIRE_KEY
        self.max_body = settings.ROUTERPANEL_MAX_BODY_BYTES
        self.deployment = settings.ROUTERPANEL_DEPLOYMENT_ID  # the hop marker (proxy.loops)
        self.explainer = Explainer(
            enabled=settings.ROUTERPANEL_EXPLAIN,
            retention=settings.ROUTERPANEL_EXPLAIN_RETENTION,
            max_records=settings.ROUTERPANEL_EXPLAIN_MAX_RECORDS,
        )
        self.shared.explainer = self.explainer  # flushed to Redis by the worker's loop
        self.budgets = self.shared.budgets  # the keys' token use, shared by the same loop
        self.accounting = self.shared.accounting  # usage per key, model and node, flushed by it too
        metrics.register_inflight(self._inflight_by_node)

    def _inflight_by_node(self) -> Iterator[tuple[str, int]]:
        nodes = snapshots.current().nodes
        for node_id, count in self.router.load.counts().items():
            node = nodes.get(node_id)
            yield (node.url if node else f"node-{node_id}"), count

    # -- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        loop = asyncio.get_running_loop()  # once per request: a system call on Python 3.11 (proxy.upstream)
        if self.watcher.loop is not loop:
            await self.startup()
        path = scope["path"]
        method = scope["method"]
        endpoint = PATHS.get(path)
        try:
            if endpoint is not None:
                if method != "POST":
                    raise ProxyError(405, f"Use POST for {path}.", "method_not_allowed")
                await self.completion(scope, receive, send, loop, path, *endpoint)
            elif path == "/v1/models" or path.startswith(MODEL_PREFIX):
                await self.models(scope, send)
            elif path == "/health":
                body = json.dumps(
                    {
                        "status": "ok",
                        "snapshot_version": snapshots.current().version,
                        "health_version": self.shared.health.applied(),
                        "pid": os.getpid(),
                    }
                ).encode()
                await send_bytes(send, 200, body)
            elif path == "/health/ready":
                ready, report = readiness(snapshots.current(), self.router.breakers)
                await send_bytes(send, 200 if ready else 503, json.dumps(report).encode())
            elif path == "/metrics":
                await send_bytes(send, 200, generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST.encode())
            else:
                raise ProxyError(404, f"Unknown path {path}.", "unknown_url")
        except ProxyError as exc:
            metrics.count_error(exc.code)
            await _send_error(send, exc, exc.headers)

    async def startup(self) -> None:
        """Build the first snapshot and start the watcher on this loop (uvicorn's lifespan start-up;
        under daphne, which has no lifespan, the first request)."""
        await self.watcher.ensure_started()
        try:
            await self.shared.read_health()  # route by the live health from the first request on
        except Exception as exc:  # Redis away: the database's health until the loop reads it
            logger.warning("could not read the live node health at start-up (%s); using the database's", exc)
        self.shared.start()
        # Django, DRF and friends leave ~100k long-lived objects; keep the cyclic GC from rescanning
        # them on every full collection (cheaper per request, and no periodic pauses), and let young
        # collections wait for more allocations (docs/decisions/0004-gc-freeze.md).
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    async def lifespan(self, receive: Receive, send: Send) -> None:
        """Uvicorn's start-up and shutdown: build the snapshot before serving; at the end finish the PD
        clean-ups (``proxy.pd.cleanup``), then close the pool."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # pragma: no cover - start-up must report, not hang
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # The KV releases still gathering or in flight go out before the engine pool closes.
                await finish_cleanups()
                await self.watcher.stop()
                await self.shared.stop()
                await close_session()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- Endpoints -----------------------------------------------------------------------------

    def authenticate(self, snap: Snapshot, headers: RequestHeaders) -> KeyView | None:
        """The caller's key from ``Authorization: Bearer``; 401 when missing or unknown (OpenAI's
        ``invalid_api_key``: a key that exists but may not use a model is the 403)."""
        if not self.require_key:
            return None
        raw = headers.authorization
        if not raw:
            raise ProxyError(401, "Missing API key: send Authorization: Bearer <key>.", "missing_api_key")
        scheme, _, token = raw.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise ProxyError(401, "Malformed Authorization header: use Bearer <key>.", "missing_api_key")
        key = snap.key_for(token)
        if key is None:
            raise ProxyError(401, "Incorrect API key provided.", "invalid_api_key")
        return key

    async def models(self, scope: Scope, send: Send) -> None:
        """``GET /v1/models`` and ``GET /v1/models/{id}``, both from the routing snapshot."""
        path = scope["path"]
        if scope["method"] != "GET":
            raise ProxyError(405, f"Use GET for {path}.", "method_not_allowed")
        snap = snapshots.current()
        key = self.authenticate(snap, RequestHeaders.parse(scope["headers"]))
        if path == "/v1/models":
            await send_bytes(send, 200, snap.models_body(key))
        else:
            await send_bytes(send, 200, model_object(snap, key, path[len(MODEL_PREFIX) :]))

    async def completion(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        loop: asyncio.AbstractEventLoop,
        path: str,
        endpoint: str,
        field: str,
    ) -> None:
        """Every request routed by the body's model (``proxy.surface.PATHS``): chat and completions,
        which may take the PD way, and the rest of the surface, hybrid only."""
        started = time.perf_counter()
        snap = snapshots.current()
        headers = RequestHeaders.parse(scope["headers"])
        if headers.hops is not None:  # sent by a RouterPanel: maybe by this one (before the key: we send none)
            check_hops(self.deployment, headers.hops)
        request_id = headers.request_id or _new_request_id()
        key: KeyView | None = None
        model: object = None
        try:
            key = self.authenticate(snap, headers)
            if key is not None and self.shared.share_counters:
                self.shared.key_used[key.id] = time.time()  # copied to ApiKey.last_used_at off the hot path
            try:
                body = await read_body(receive, self.max_body, headers.content_length)
            except ClientGone:
                return
            try:
                payload = parse_json(body)
            except (ValueError, UnicodeDecodeError):
                raise bad_request("The request body is not valid JSON.", "invalid_json") from None
            except RecursionError:  # a body nested deeper than the parser's stack, e.g. [[[[...]]]]
                raise bad_request("The request body is nested too deeply.", "invalid_json") from None
            if not isinstance(payload, dict):
                raise bad_request("The request body must be a JSON object.", "invalid_json")
            model = payload.get("model")
            if not isinstance(model, str) or not model:
                raise bad_request("The request needs a model.", "missing_model")
            if field and field not in payload:
                raise bad_request(f"The request needs {field!r}.", f"missing_{field}")
            stream = payload.get("stream", False)
            if not isinstance(stream, bool) and stream is not None:
                # Engines read a string like "no" as true; answer as OpenAI does instead of guessing.
                raise bad_request("'stream' must be true or false.", "invalid_stream")
            explanation = self.explainer.begin(request_id, key, model, path, stream is True, started, headers.explain)
            try:
                route, limited = self.admit(snap, key, model, explanation, endpoint=endpoint, path=path)
            except ProxyError as exc:
                if explanation is not None:
                    self.explainer.refused(explanation, exc)
                raise
        except ProxyError:
            # Refused before reaching an engine: an error of the key (docs/usage.md), under the route's
            # name when it has one, so that what clients send cannot add names to the counts.
            known = snap.routes.get(model) if isinstance(model, str) else None
            self.accounting.refused(key, "-" if known is None else known.name)
            raise
        request = ProxyRequest(
            path=path,
            model=model,
            route=route,
            payload=payload,
            body=body,
            stream=stream is True,
            request_id=request_id,
            headers=headers,
            hop=self.deployment if headers.hops is None else hop_value(self.deployment, headers.hops),
            explain=explanation,
        )
        outcome = Outcome()
        watcher = DisconnectWatcher(receive, loop)
        try:
            if wants_pd(route):
                await proxy_pd(request, send, self.router, watcher, outcome)
            else:
                await proxy_hybrid(request, send, self.router, watcher, outcome)
        except ProxyError as exc:
            outcome.status, outcome.error = exc.status, exc.code
            metrics.count_error(exc.code)
            watcher.finish()
            extra = [*exc.headers, (b"x-request-id", request_id.encode("latin-1"))]
            if explanation is not None:
                extra += explanation.failed(exc)
            await _send_error(send, exc, extra=extra)
        except asyncio.CancelledError:
            if not watcher.client_gone:
                raise
            # Our own cancellation on client disconnect: upstream is closed and counters released
            # (the ``finally`` blocks ran); end quietly instead of logging an application error.
            task = asyncio.current_task(loop)
            assert task is not None  # this coroutine runs in the server's task for the request
            task.uncancel()
            outcome.status, outcome.error = 499, "client_disconnected"
            metrics.count_error("client_disconnected")
        finally:
            watcher.close()
            if limited is not None:
                self.limiter.release(limited)
            self.accounting.record(key, route.name, outcome)
            if outcome.error and outcome.error != "client_disconnected" and outcome.status == 200:
                metrics.count_error(outcome.error)
            metrics.observe_request(route.name, outcome.node, outcome.status, time.perf_counter() - started)
            if outcome.ttft is not None:
                metrics.observe_stream(route.name, outcome.ttft, outcome.mean_gap)
            if explanation is not None:
                self.explainer.finish(explanation, outcome)

    def admit(
        self,
        snap: Snapshot,
        key: KeyView | None,
        model: str,
        explanation: Explanation | None,
        *,
        endpoint: str,
        path: str,
    ) -> tuple[Route, KeyView | None]:
        """The route for ``model`` (narrowed to the nodes serving ``endpoint``: ``proxy.surface``),
        and the key whose limits the request holds (released when it ends); 404, 403 or 429 when
        the model is unknown, none of its nodes serves the endpoint or the key may not use it now."""
        route = snap.routes.get(model)
        if route is None:
            raise ProxyError(404, f"The model {model!r} does not exist.", "model_not_found")
        if explanation is not None:
            explanation.route = route
        if key is not None and not key.allows(route):
            raise ProxyError(403, f"This API key may not use the model {model!r}.", "model_not_allowed")
        route = route_for(route, endpoint, path)
        if explanation is not None:
            explanation.route = route
        if key is not None and (key.tokens_per_minute is not None or key.tokens_per_day is not None):
            over = self.budgets.exceeded(key)
            if over is not None:
                budget, retry_after = over
                raise ProxyError(
                    429,
                    f"This API key used up its token budget ({budget}); retry in {retry_after} s.",
                    "token_budget_exceeded",
                    headers=[(b"retry-after", str(retry_after).encode())],
                )
        if key is not None and (key.rate_limit_rpm is not None or key.max_concurrent is not None):
            exceeded = self.limiter.try_acquire(key)
            if exceeded is not None:
                retry_after = self.limiter.retry_after() if exceeded == "rate_limit_rpm" else 1
                raise ProxyError(
                    429,
                    f"This API key exceeded its limit ({exceeded}); retry in {retry_after} s.",
                    "rate_limit_exceeded",
                    headers=[(b"retry-after", str(retry_after).encode())],
                )
            return route, key
        return route, None


_app: ProxyApp | None = None


def get_app() -> ProxyApp:
    """The process's proxy app (built on first use, after Django's settings are loaded)."""
    global _app
    if _app is None:
        _app = ProxyApp()
    return _app
