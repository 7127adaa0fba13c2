"""Prefill/decode (PD) orchestration (docs/pd.md), in one place.

``proxy_pd`` serves a request whose route is in PD serving mode (``wants_pd``): it picks a prefill
and a decode node with the route's strategy (separate counters per role), runs the engine family's
protocol (NanoDeploy/DLEngine, vLLM, LMDeploy two-stage; SGLang dual dispatch) and guarantees that
every counter and every KV hold on a prefill node is released, on every path: success, engine error,
timeout, mid-stream failure, and a client that leaves at any moment.

- ``core``     the PD request: its pair of nodes, the legs' types, the serving-mode decision
- ``legs``     the prefill and decode legs through the attempt loop; the prefill's own answers
- ``flows``    the two sequencings: two-stage and dual dispatch
- ``engines``  per-engine protocol steps, registered by engine type
- ``lmdeploy`` LMDeploy's DistServe wire shapes and the per-pair p2p link
- ``usage``    prompt tokens from the prefill merged into the decode's usage
- ``cleanup``  background tasks that outlive a client disconnect; KV frees
- ``metrics``  per-leg durations, errors and frees; gauges of PD requests and pending clean-ups
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from nodes.choices import EngineType

from ..errors import ProxyError
from ..request import Outcome, ProxyRequest
from ..router import Router
from ..transport import DisconnectWatcher, Send
from . import metrics as pd_metrics
from .cleanup import finish as finish_cleanups
from .cleanup import pending_cleanups
from .core import PdRequest, inflight, wants_pd
from .engines import SGLANG, TWO_STAGE
from .flows import dual_dispatch, two_stage

__all__ = ["finish_cleanups", "inflight", "pending_cleanups", "proxy_pd", "wants_pd"]

pd_metrics.register_gauges(inflight, pending_cleanups)


# Looked up once, as ``proxy.snapshot.ROLE_*`` are.
_NANODEPLOY, _OPENAI, _SGLANG = EngineType.NANODEPLOY, EngineType.OPENAI, EngineType.SGLANG


def _engine_type(request: ProxyRequest) -> str:
    """The PD protocol is the engine family of the route's prefill/decode nodes (the prefill's when
    they differ; a plain OpenAI node speaks the project's default, NanoDeploy)."""
    route = request.route
    for targets in (route.prefill, route.decode):
        if targets:
            engine = targets[0].node.engine_type
            return _NANODEPLOY if engine == _OPENAI else engine
    return _NANODEPLOY


def proxy_pd(
    request: ProxyRequest, send: Send, router: Router, watcher: DisconnectWatcher, outcome: Outcome
) -> Coroutine[Any, Any, None]:
    """The PD path for one request (a coroutine to await: no frame of its own on the hot path)."""
    pd = PdRequest(request, send, router, watcher, outcome)
    engine = _engine_type(request)
    if engine == _SGLANG:
        return dual_dispatch(pd, SGLANG)
    protocol = TWO_STAGE.get(engine)
    if protocol is None:
        raise ProxyError(503, f"Engine type {engine!r} has no PD protocol.", "pd_unsupported_engine")
    return two_stage(pd, protocol)
