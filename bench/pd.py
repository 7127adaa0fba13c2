"""The PD phase of ``make bench PD=1``: what a prefill/decode request costs the web worker.

A ``demo-pd``-style pair (one NanoDeploy prefill engine and one decode engine, simulated, in fast
mode) serves ``pd-model``; RouterPanel splits each request into its two legs (docs/pd.md). wrk at
concurrency 32 measures requests/s and the web process's CPU per request, to set beside a hybrid
request's at the same concurrency (the target is at most 1.6 times), and how many KV releases one
``/pd/free`` call carried on average (RouterPanel gathers a prefill node's releases, docs/pd.md).

bench/run.py measures the hybrid figure twice, before the PD phase and right after it, and divides
by their mean, so that the ratio does not compare two moments of a machine whose speed drifts. It
also splits both figures into user space and the kernel (``/proc/<pid>/stat``'s utime and stime):
the user-space ratio is the one ``make bench-instructions`` counts, and the kernel's share of a
request is about the same for both kinds, so the whole ratio is lower than the user-space one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from bench.measure import WrkResult, chat_body, run_wrk
from bench.peers import PATH, wait_ready
from enginesim.shapes import SimStats
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


@dataclass
class PdFigures:
    wrk: WrkResult
    frees_per_call: float  # KV ids a /pd/free call named, on average


def measure_pd(proxy: str, auth: dict, pid: int, prefill: Simulator, duration: int, workers: int = 1) -> PdFigures:
    """wrk at c32 on ``PD_MODEL`` through the proxy (``pid`` and its worker processes); fails unless
    the requests really went through PD."""
    for _ in range(4 * workers):  # new connections land on any worker: each must have the model
        wait_ready(proxy, PD_MODEL, headers=auth)
    before = prefill.stats()
    result = run_wrk(proxy + PATH, auth, chat_body(PD_MODEL, 16), 32, duration, pid, tree=True)
    after = frees_sent(prefill)
    allocated = after["kv"]["allocated"] - before["kv"]["allocated"]
    if allocated < result.requests // 2:
        raise RuntimeError(f"the prefill engine saw few of {result.requests} PD requests: {after}")
    return PdFigures(result, frees_per_call(before, after))


def frees_sent(prefill: Simulator, timeout: float = 10.0) -> SimStats:
    """The prefill engine's stats once it holds no KV: the last releases went out (they follow the
    last answer by the worker's free window)."""
    return prefill.wait_for(lambda stats: stats["kv"]["outstanding_count"] == 0, timeout=timeout)


def frees_per_call(before: SimStats, after: SimStats) -> float:
    """KV ids a ``/pd/free`` call named on average between two of the prefill engine's stats."""
    calls = after["requests"]["by_endpoint"].get("/pd/free", 0) - before["requests"]["by_endpoint"].get("/pd/free", 0)
    freed = after["kv"]["freed"] - before["kv"]["freed"]
    return freed / calls if calls else float("nan")
