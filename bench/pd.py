"""The PD phase of ``make bench PD=1``: what a prefill/decode request costs the web worker.

A ``demo-pd``-style pair (one NanoDeploy prefill engine and one decode engine, simulated, in fast
mode) serves ``pd-model``; RouterPanel splits each request into its two legs (docs/pd.md). wrk at
concurrency 32 measures requests/s and the web process's CPU per request, to set beside a hybrid
request's at the same concurrency (the target is at most 1.6 times).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx

from bench.measure import WrkResult, chat_body, run_wrk
from bench.peers import PATH, wait_ready
from enginesim.testing import Simulator, SimulatorOptions, run_simulator

PD_MODEL = "pd-model"


def _engine(role: str) -> SimulatorOptions:
    return {
        "engine": "nanodeploy",
        "role": role,
        "served_model_name": PD_MODEL,
        "model_path": f"/models/{PD_MODEL}",
        "extra_args": ["--fast", "--record-requests=0"],
    }


@contextlib.contextmanager
def pd_engines() -> Iterator[tuple[Simulator, Simulator]]:
    """A prefill and a decode engine serving ``PD_MODEL``, as ``python -m enginesim.demo`` runs them."""
    with (
        run_simulator(**_engine("prefill")) as prefill,
        run_simulator(**_engine("decode")) as decode,
    ):
        yield prefill, decode


def register(api: httpx.Client, prefill: Simulator, decode: Simulator) -> None:
    for sim, role in ((prefill, "prefill"), (decode, "decode")):
        node = {"url": sim.url, "models": [PD_MODEL], "engine_type": "nanodeploy", "role": role}
        api.post("/api/nodes/", json=node).raise_for_status()


def measure_pd(proxy: str, auth: dict, pid: int, prefill: Simulator, duration: int) -> WrkResult:
    """wrk at c32 on ``PD_MODEL`` through the proxy; fails unless the requests really went through PD."""
    wait_ready(proxy, PD_MODEL, headers=auth)
    before = prefill.stats()["kv"]["allocated"]
    result = run_wrk(proxy + PATH, auth, chat_body(PD_MODEL, 16), 32, duration, pid)
    if prefill.stats()["kv"]["allocated"] - before < result.requests // 2:
        raise RuntimeError(f"the prefill engine saw few of {result.requests} PD requests: {prefill.stats()}")
    return result
