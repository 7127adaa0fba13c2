"""Prometheus metrics of the data path (served at ``/metrics``).

Label sets are bounded: ``model`` is a route name from the snapshot (or ``"-"`` before one is
known), ``node`` a node URL from the snapshot (or ``"-"``), ``status`` an HTTP status, ``kind``
one of the error codes the proxy emits. Labelled children are cached so the hot path does one
dict lookup per metric. Metrics are per process (one scrape target per web worker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter(
    "routerpanel_proxy_requests", "Proxied requests by model, node and response status.", ["model", "node", "status"]
)
DURATION = Histogram(
    "routerpanel_proxy_request_duration_seconds",
    "Time from request to the end of the response.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
TTFT = Histogram(
    "routerpanel_proxy_time_to_first_token_seconds",
    "Time from request to the first streamed chunk.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
ITL = Histogram(
    "routerpanel_proxy_inter_token_latency_seconds",
    "Mean gap between streamed chunks, one sample per stream.",
    ["model"],
    buckets=_ITL_BUCKETS,
)
RETRIES = Counter("routerpanel_proxy_retries", "Attempts retried on another node.", ["model", "reason"])
ERRORS = Counter("routerpanel_proxy_errors", "Errors the proxy answered or ended a stream with.", ["kind"])

_children: dict[tuple, object] = {}


def _child(metric, *labels: str):
    key = (id(metric), *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def observe_request(model: str, node: str, status: int, duration: float) -> None:
    _child(REQUESTS, model, node, str(status)).inc()
    _child(DURATION, model).observe(duration)


def observe_stream(model: str, ttft: float | None, mean_gap: float | None) -> None:
    if ttft is not None:
        _child(TTFT, model).observe(ttft)
    if mean_gap is not None:
        _child(ITL, model).observe(mean_gap)


def count_retry(model: str, reason: str) -> None:
    _child(RETRIES, model, reason).inc()


def count_error(kind: str) -> None:
    _child(ERRORS, kind).inc()


class InflightCollector(Collector):
    """Reads in-flight counts per node at scrape time, so requests pay nothing for this gauge."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._source = source

    def collect(self):
        family = GaugeMetricFamily("routerpanel_proxy_inflight", "Requests in flight per node.", labels=["node"])
        for node, count in self._source():
            family.add_metric([node], count)
        yield family


_registered = False


def register_inflight(source: Callable[[], Iterable[tuple[str, int]]]) -> None:
    global _registered
    if not _registered:
        REGISTRY.register(InflightCollector(source))
        _registered = True
