"""Prometheus metrics of PD orchestration, per leg (served at ``/metrics`` with the rest).

Labels are bounded: ``model`` is a route name, ``leg`` is ``prefill`` or ``decode``, ``kind`` an
error code the PD path emits, ``result`` ``ok`` or ``failed``. Two gauges are read
at scrape time: PD requests being orchestrated and background clean-ups (shielded prefills, frees)
still running; both must fall back to 0 once traffic stops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy.metrics import LATENCY_BUCKETS, LocalCounter, LocalHistogram, labelled

LEG_DURATION = LocalHistogram(
    "routerpanel_proxy_pd_leg_duration_seconds",
    "Duration of each PD leg: the prefill call, and the decode call up to the end of its answer.",
    ["model", "leg"],
    LATENCY_BUCKETS,
)
LEG_ERRORS = Counter("routerpanel_proxy_pd_leg_errors", "PD legs that failed, by leg and kind.", ["leg", "kind"])
# One release per NanoDeploy PD request (several go in one /pd/free call): a plain dict, like the
# per-request metrics (``proxy.metrics``).
FREES = LocalCounter(
    "routerpanel_proxy_pd_frees",
    "KV releases RouterPanel sent to prefill nodes (NanoDeploy /pd/free, one per seq_id, LMDeploy "
    "/distserve/free_cache) by result: ok (accepted; the engines do not say whether they held the id: DLEngine "
    "queues the release and echoes the ids), failed (no answer, or an error status).",
    ["result"],
)
UNRELEASABLE = Counter(
    "routerpanel_proxy_pd_kv_unreleasable",
    "Prefill answers that preserved KV under a session no response field names (LMDeploy >= 0.15 without "
    "cache_session_id): neither RouterPanel nor the decode engine can free it (docs/pd.md).",
)
SHIELDED_PREFILLS = Counter(
    "routerpanel_proxy_pd_shielded_prefills",
    "Prefill calls that finished after their client left and held KV, which was then freed.",
)


def observe_leg(model: str, leg: str, seconds: float) -> None:
    LEG_DURATION.observe(seconds, model, leg)


def count_leg_error(leg: str, kind: str) -> None:
    labelled(LEG_ERRORS, leg, kind).inc()


def count_free(result: str, releases: int = 1) -> None:
    FREES.add(releases, result)


def count_unreleasable() -> None:
    UNRELEASABLE.inc()


def count_shielded_prefill() -> None:
    SHIELDED_PREFILLS.inc()


class PdGauges(Collector):
    def __init__(self, inflight: Callable[[], int], cleanups: Callable[[], int]) -> None:
        self._inflight = inflight
        self._cleanups = cleanups

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "routerpanel_proxy_pd_inflight", "PD requests being orchestrated now.", value=self._inflight()
        )
        yield GaugeMetricFamily(
            "routerpanel_proxy_pd_cleanups_pending",
            "Shielded prefill calls and KV frees still running in the background.",
            value=self._cleanups(),
        )


_registered = False


def register_gauges(inflight: Callable[[], int], cleanups: Callable[[], int]) -> None:
    global _registered
    if not _registered:
        REGISTRY.register(PdGauges(inflight, cleanups))
        _registered = True
