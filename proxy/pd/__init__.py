"""Prefill/decode (PD) orchestration (SPEC §4), in one place.

``proxy_pd`` serves a request whose route is in PD serving mode (``wants_pd``): it picks a prefill
and a decode node with the route's strategy (separate counters per role), runs the engine family's
protocol from ``engines`` (NanoDeploy/DLEngine, vLLM, LMDeploy two-stage; SGLang dual dispatch) and
guarantees that every counter and every KV hold on a prefill node is released, on every path:
success, engine error, timeout, mid-stream failure, and a client that leaves at any moment.

- ``core``     the PD request: pair selection, legs, relaying, usage merge, KV release, clean-up tasks
- ``engines``  per-engine protocol steps and the two sequencing functions
- ``metrics``  per-leg durations, errors and frees; gauges of PD requests and pending clean-ups
"""

from __future__ import annotations

from nodes.choices import EngineType

from ..errors import ProxyError
from ..relay import Outcome, ProxyRequest
from ..router import Router
from ..transport import DisconnectWatcher, Send
from . import core
from .core import PdRequest, inflight, pending_cleanups, wants_pd
from .engines import SGLANG, TWO_STAGE, dual_dispatch, two_stage

__all__ = ["inflight", "pending_cleanups", "proxy_pd", "wants_pd"]


def _engine_type(request: ProxyRequest) -> str:
    """The PD protocol is the engine family of the route's prefill/decode nodes (the prefill's when
    they differ; a plain OpenAI node speaks the project's default, NanoDeploy)."""
    route = request.route
    for targets in (route.prefill, route.decode):
        if targets:
            engine = targets[0].node.engine_type
            return EngineType.NANODEPLOY if engine == EngineType.OPENAI else engine
    return EngineType.NANODEPLOY


async def proxy_pd(
    request: ProxyRequest, send: Send, router: Router, watcher: DisconnectWatcher, outcome: Outcome
) -> None:
    pd = PdRequest(request, send, router, watcher, outcome)
    engine = _engine_type(request)
    core._inflight += 1
    try:
        if engine == EngineType.SGLANG:
            await dual_dispatch(pd, SGLANG)
        elif engine in TWO_STAGE:
            await two_stage(pd, TWO_STAGE[engine])
        else:
            raise ProxyError(503, f"Engine type {engine!r} has no PD protocol.", "pd_unsupported_engine")
    finally:
        core._inflight -= 1
