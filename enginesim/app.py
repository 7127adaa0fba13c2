"""The simulated engine: request routing, OpenAI endpoints, latency model, faults, stats and admin endpoints."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict

from enginesim.config import SimConfig
from enginesim.faults import FaultError, Faults, RequestFaults
from enginesim.flavours import flavour_for
from enginesim.http import STREAM_HEADERS, ClientGone, HttpServer, Request, Response, render_head, render_response
from enginesim.inference import Handler, InferenceRequest, parse_json
from enginesim.kv import KvLedger
from enginesim.openai import HttpError, Plan, dumps, error_type_for
from enginesim.shapes import SimStats
from enginesim.stats import RequestLog, RequestStats

logger = logging.getLogger("enginesim")

FAST_CACHE_MAX = 4096


class SimulatorApp:
    """One simulated engine. The HTTP layer calls ``handle_fast`` then ``handle`` for each request."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.stats = RequestStats()
        self.log = RequestLog(config.record_requests)
        self.faults = Faults.from_options(config.faults)
        self.kv = KvLedger()
        self.server: HttpServer | None = None
        self.accepted_models = config.accepted_model_names
        self._fast_cache: dict[tuple[str, bytes], bytes] = {}
        self.flavour = flavour_for(config.engine)(config, self.kv, self.stats)
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/health"): self.health,
            ("GET", "/v1/models"): self.models,
            **self.flavour.routes(),
        }
        if self.flavour.generates:
            self.routes[("POST", "/v1/chat/completions")] = self.chat_completions
            self.routes[("POST", "/v1/completions")] = self.completions
        self.admin_routes: dict[tuple[str, str], Handler] = {
            ("GET", "/sim/stats"): self.sim_stats,
            ("GET", "/sim/requests"): self.sim_requests,
            ("DELETE", "/sim/requests"): self.sim_requests_clear,
            ("GET", "/sim/faults"): self.sim_faults,
            ("POST", "/sim/faults"): self.sim_faults_set,
            ("DELETE", "/sim/faults"): self.sim_faults_clear,
            ("POST", "/sim/reset"): self.sim_reset,
            ("GET", "/sim/config"): self.sim_config,
            **self.flavour.admin_routes(),
        }

    # HTTP entry points
    def handle_fast(self, request: Request) -> bytes | None:
        """Fast mode: answer a repeated identical request from cache, without a task or a sleep."""
        if not self.config.fast or self.faults.any_active:
            return None
        hit = self._fast_cache.get((request.path, request.body))
        if hit is None:
            return None
        stats = self.stats
        stats.total += 1
        stats.by_endpoint[request.path] += 1
        stats.by_status["200"] += 1
        stats.completed += 1
        self.log.record(request)
        if not request.keep_alive:
            return hit.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
        return hit

    async def handle(self, request: Request, response: Response) -> None:
        key = (request.method, request.path)
        if request.path.startswith("/sim/"):
            handler = self.admin_routes.get(key)
            if handler is None:
                response.send_json(404, HttpError(404, f"no route {request.method} {request.path}").body())
                return
            try:
                await handler(request, response)
            except HttpError as err:
                response.send_json(err.status, err.body())
            return
        self.stats.total += 1
        self.stats.by_endpoint[request.path] += 1
        self.stats.in_flight += 1
        self.log.record(request)
        try:
            handler = self.routes.get(key)
            if handler is None:
                known = any(path == request.path for _, path in self.routes)
                status = 405 if known else 404
                payload = self.flavour.not_found if status == 404 else None
                raise HttpError(status, f"no route {request.method} {request.path}", code=status, payload=payload)
            await handler(request, response)
            self.stats.completed += 1
        except HttpError as err:
            self.stats.by_status[str(err.status)] += 1
            if isinstance(err.payload, str):
                response.send(err.status, err.payload.encode(), "text/plain; charset=utf-8")
            else:
                response.send_json(err.status, err.body())
            self.stats.completed += 1
        except (asyncio.CancelledError, ClientGone):
            # The client went away before the answer was complete (the proxy cancelled us).
            self.stats.cancelled += 1
            raise
        finally:
            self.stats.in_flight -= 1

    # Engine endpoints
    async def health(self, request: Request, response: Response) -> None:
        if self.faults.fail_health:
            raise HttpError(503, "injected fault: health check failing", type="server_error")
        self.stats.by_status["200"] += 1
        response.send(200, b"OK", "text/plain")

    async def models(self, request: Request, response: Response) -> None:
        self.stats.by_status["200"] += 1
        model = {
            "id": self.config.served_model_name,
            "object": "model",
            "created": int(self.started_at),
            "owned_by": self.flavour.owned_by,
            "root": self.config.model_path,
            "parent": None,
        }
        response.send_json(200, {"object": "list", "data": [model]})

    async def chat_completions(self, request: Request, response: Response) -> None:
        await self._inference(request, response, "chat")

    async def completions(self, request: Request, response: Response) -> None:
        await self._inference(request, response, "completion")

    # The inference path
    async def _inference(self, request: Request, response: Response, kind: str) -> None:
        rank = request.header("x-data-parallel-rank")
        if rank is not None:
            self.stats.by_dp_rank[rank] += 1
        injected = self.faults.take()
        if injected is not None:
            self.stats.faults_injected += 1
            await self._apply_entry_faults(injected)
        req = self.flavour.parse(request, kind)
        plan = await self.flavour.plan(req)
        extra_headers = self.flavour.response_headers(req)
        delay = not self.config.fast
        slow_ms = injected.slow_first_token_ms if injected else 0.0
        close_after = injected.close_after_chunks if injected else None
        if req.stream and not plan.force_non_stream:
            await self._stream(req, plan, response, extra_headers, delay, slow_ms, close_after)
            return
        if delay or slow_ms:
            steps = max(1, plan.steps)
            await asyncio.sleep((self.config.ttft_ms + slow_ms + self.config.itl_ms * (steps - 1)) / 1000.0)
        if close_after is not None:
            self._abort(plan, response)
            return
        body = dumps(plan.full_body())
        self.stats.by_status["200"] += 1
        if self.config.fast and plan.cacheable and injected is None and not extra_headers:
            self._cache(request, render_response(200, body, "application/json", extra_headers))
        response.send(200, body, headers=extra_headers)

    async def _apply_entry_faults(self, injected: RequestFaults) -> None:
        if injected.crash:
            logger.warning("injected fault: crashing")
            os._exit(3)
        if injected.error_status is not None:
            status = injected.error_status
            raise HttpError(status, f"injected fault: error {status}", type=error_type_for(status))
        if injected.hang:
            await asyncio.get_running_loop().create_future()  # never answers; cancelled when the client leaves

    async def _stream(
        self,
        req: InferenceRequest,
        plan: Plan,
        response: Response,
        headers: list[tuple[str, str]],
        delay: bool,
        slow_ms: float,
        close_after: int | None,
    ) -> None:
        style = self.flavour.stream_style
        steps = plan.stream_steps(style, req.include_usage)
        tail = plan.stream_tail(req.include_usage, style)
        self.stats.by_status["200"] += 1
        if not delay and not slow_ms and close_after is None:
            whole = b"".join(b"".join(events) for events in steps) + b"".join(tail)
            response.start_stream(200, headers)
            response.write(whole)
            response.end_stream()
            # As for whole answers: a request id changes nothing here (a flavour that names its answer
            # after it marks the plan not cacheable), so a proxy that sends one is served as fast as
            # a client that does not.
            if self.config.fast and plan.cacheable and not headers:
                head = render_head(200, [*STREAM_HEADERS, *headers])
                self._cache(req.request, head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(whole), whole))
            return
        response.start_stream(200, headers)
        sent = 0
        first_wait = (self.config.ttft_ms if delay else 0.0) + slow_ms
        for i, events in enumerate([*steps, tail]):
            wait = first_wait if i == 0 else (self.config.itl_ms if delay and i < len(steps) else 0.0)
            if wait:
                await asyncio.sleep(wait / 1000.0)
            for event in events:
                if close_after is not None and sent >= close_after:
                    self._abort(plan, response)
                    return
                response.write(event)
                sent += 1
            await response.drain()
        response.end_stream()

    def _abort(self, plan: Plan, response: Response) -> None:
        """Drop the connection mid-answer (injected fault), releasing KV whose id never left the engine."""
        self.stats.aborted += 1
        if plan.kv_key is not None:
            self.kv.free(plan.kv_key)
        response.abort()

    def _cache(self, request: Request, data: bytes) -> None:
        if len(self._fast_cache) >= FAST_CACHE_MAX:
            self._fast_cache.clear()
        self._fast_cache[(request.path, request.body)] = data

    # Admin endpoints (/sim/*)
    async def sim_stats(self, request: Request, response: Response) -> None:
        response.send_json(200, self.stats_snapshot())

    def stats_snapshot(self) -> SimStats:
        return {
            "engine": self.config.engine,
            "role": self.config.role,
            "served_model_name": self.config.served_model_name,
            "host": self.config.host,
            "port": self.config.port,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "requests": self.stats.snapshot(),
            "kv": self.kv.snapshot(),
            "pd": self.flavour.stats(),
        }

    async def sim_requests(self, request: Request, response: Response) -> None:
        limit = request.query_params().get("limit")
        try:
            count = int(limit[0]) if limit else None
        except ValueError:
            raise HttpError(400, "limit must be an integer") from None
        response.send_json(200, {"requests": self.log.snapshot(count)})

    async def sim_requests_clear(self, request: Request, response: Response) -> None:
        self.log.clear()
        response.send_json(200, {"requests": []})

    async def sim_faults(self, request: Request, response: Response) -> None:
        response.send_json(200, self.faults.to_json())

    async def sim_faults_set(self, request: Request, response: Response) -> None:
        """Replace the active faults (fields left out are off); ``{}`` clears them all."""
        try:
            faults = Faults.from_json(parse_json(request))
        except (FaultError, TypeError) as exc:
            raise HttpError(400, str(exc)) from None
        await self.set_faults(faults)
        response.send_json(200, self.faults.to_json())

    async def sim_faults_clear(self, request: Request, response: Response) -> None:
        await self.set_faults(Faults())
        response.send_json(200, self.faults.to_json())

    async def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self._fast_cache.clear()
        if self.server is not None:
            if faults.refuse_connections:
                self.server.stop_listening()
            else:
                await self.server.start()

    async def sim_reset(self, request: Request, response: Response) -> None:
        """Forget counters, recorded requests, faults and the KV ledger (between test cases)."""
        self.stats.reset()
        self.log.clear()
        self.kv.reset()
        self.flavour.reset()
        await self.set_faults(Faults())
        response.send_json(200, self.stats_snapshot())

    async def sim_config(self, request: Request, response: Response) -> None:
        config = asdict(self.config)
        config["accepted_model_names"] = self.accepted_models
        response.send_json(200, config)
