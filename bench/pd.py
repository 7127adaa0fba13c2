"""The PD phase of ``make bench PD=1``: what a prefill/decode request costs the web worker.

A ``demo-pd``-style pair (one NanoDeploy prefill engine and one decode engine, simulated, in fast
mode) serves ``pd-model``; RouterPanel splits each request into its two legs (docs/pd.md). wrk at
concurrency 32 measures requests/s and the web process's CPU per request, to set beside a hybrid
request's at the same concurrency (the target is at most 1.6 times), and how many KV releases one
``/pd/free`` call carried on average (RouterPanel gathers a prefill node's releases, docs/pd.md).

A small shared machine's speed drifts by a third within minutes (the hybrid figure measured right
before and right after one PD run differed by that much), so ``rounds`` alternates the two loads:
PD, hybrid, PD, hybrid... after the run's hybrid c=32 figure. Each PD run is divided by the mean of
the hybrid runs on either side of it, and the ratio reported is the median of those. Both figures
are also split into user space and the kernel (``/proc/<pid>/stat``'s utime and stime): the
user-space ratio is the one ``make bench-instructions`` counts, and the kernel's share of a request
is about the same for both kinds, so the whole ratio is lower than the user-space one.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterator
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


def measure_pd(
    proxy: str,
    auth: dict,
    pid: int,
    prefill: Simulator,
    duration: int,
    workers: int = 1,
    watch: dict[str, list[int]] | None = None,
) -> PdFigures:
    """wrk at c32 on ``PD_MODEL`` through the proxy (``pid`` and its worker processes); fails unless
    the requests really went through PD. ``watch``: as ``run_wrk``'s (the cores each tree used)."""
    for _ in range(4 * workers):  # new connections land on any worker: each must have the model
        wait_ready(proxy, PD_MODEL, headers=auth)
    before = prefill.stats()
    result = run_wrk(proxy + PATH, auth, chat_body(PD_MODEL, 16), 32, duration, pid, tree=True, watch=watch)
    after = frees_sent(prefill)
    allocated = after["kv"]["allocated"] - before["kv"]["allocated"]
    if allocated < result.requests // 2:
        raise RuntimeError(f"the prefill engine saw few of {result.requests} PD requests: {after}")
    return PdFigures(result, frees_per_call(before, after))


ROUNDS = 3


@dataclass
class PdRounds:
    """PD runs alternated with hybrid ones (see the module doc)."""

    pd: list[PdFigures]
    hybrid: list[WrkResult]  # one more than ``pd``: the run's own hybrid figure first
    warmup: PdFigures  # the PD run before them, not counted

    def _ratios(self, figure: Callable[[WrkResult], float]) -> list[float]:
        return [
            figure(run.wrk) / ((figure(self.hybrid[i]) + figure(self.hybrid[i + 1])) / 2)
            for i, run in enumerate(self.pd)
        ]

    def ratios(self) -> list[float]:
        """Each PD run's CPU per request over its neighbouring hybrid runs' mean."""
        return self._ratios(lambda result: result.cpu_us or math.nan)

    def user_ratios(self) -> list[float]:
        return self._ratios(lambda result: (result.cpu_us or math.nan) - (result.kernel_us or math.nan))

    def kernel_ratios(self) -> list[float]:
        return self._ratios(lambda result: result.kernel_us or math.nan)

    def median(self, figure: Callable[[WrkResult], float | None]) -> float:
        return statistics.median((figure(run.wrk) or math.nan) for run in self.pd)

    def cores(self) -> tuple[dict[str, float], dict[str, float]]:
        """The cores each watched process tree used, median over the PD runs and over the hybrid
        runs between them: how busy the machine was under each load (docs/architecture.md, "A PD
        request's instructions run slower")."""

        def medians(results: list[WrkResult]) -> dict[str, float]:
            names = results[0].cores if results else {}
            return {name: statistics.median(result.cores.get(name, math.nan) for result in results) for name in names}

        return medians([run.wrk for run in self.pd]), medians(self.hybrid[1:])


def rounds(
    measure: Callable[[], PdFigures], hybrid: Callable[[], WrkResult], first: WrkResult, count: int = ROUNDS
) -> PdRounds:
    """``count`` PD runs (``measure``), each followed by a hybrid one (``hybrid``), after ``first``
    and after one PD run that is not counted: the hybrid figures come from a worker that has served
    that load for a while, and the first PD run at concurrency 32 opens the connections to the PD
    engines and runs the PD code for the first time."""
    result = PdRounds([], [first], measure())
    for _ in range(count):
        result.pd.append(measure())
        result.hybrid.append(hybrid())
    return result


def frees_sent(prefill: Simulator, timeout: float = 10.0) -> SimStats:
    """The prefill engine's stats once it holds no KV: the last releases went out (they follow the
    last answer by the worker's free window)."""
    return prefill.wait_for(lambda stats: stats["kv"]["outstanding_count"] == 0, timeout=timeout)


def frees_per_call(before: SimStats, after: SimStats) -> float:
    """KV ids a ``/pd/free`` call named on average between two of the prefill engine's stats."""
    calls = after["requests"]["by_endpoint"].get("/pd/free", 0) - before["requests"]["by_endpoint"].get("/pd/free", 0)
    freed = after["kv"]["freed"] - before["kv"]["freed"]
    return freed / calls if calls else float("nan")
