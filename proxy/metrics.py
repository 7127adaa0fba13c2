"""Prometheus metrics of the data path (served at ``/metrics``).

Label sets are bounded: ``model`` is a route name from the snapshot (or ``"-"`` before one is
known), ``node`` a node URL from the snapshot (or ``"-"``), ``status`` an HTTP status, ``kind``
one of the error codes the proxy emits. Labelled children are cached so the hot path does one
dict lookup per metric. Metrics are per process (one scrape target per web worker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter(
    "routerpanel_proxy_requests", "Proxied requests by model, node and response status.", ["model", "node", "status"]
)
DURATION = Histogram(
    "routerpanel_proxy_request_duration_seconds",
    "Time from request to the end of the response.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
TTFT = Histogram(
    "routerpanel_proxy_time_to_first_token_seconds",
    "Time from request to the first streamed chunk.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
ITL = Histogram(
    "routerpanel_proxy_inter_token_latency_seconds",
    "Mean gap between streamed chunks, one sample per stream.",
    ["model"],
    buckets=_ITL_BUCKETS,
)
RETRIES = Counter("routerpanel_proxy_retries", "Attempts retried on another node.", ["model", "reason"])
ERRORS = Counter("routerpanel_proxy_errors", "Errors the proxy answered or ended a stream with.", ["kind"])

_M = TypeVar("_M", bound=MetricWrapperBase)

# Every labelled child made so far, keyed by (id of its metric, *labels): the child of metric M is
# always of M's type, which the dict cannot say, hence Any.
_children: dict[tuple[int | str, ...], Any] = {}


def labelled(metric: _M, *labels: str) -> _M:
    """``metric.labels(*labels)``, made once per label set so the hot path does one dict lookup."""
    key: tuple[int | str, ...] = (id(metric), *labels)
    child: _M | None = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def observe_request(model: str, node: str, status: int, duration: float) -> None:
    labelled(REQUESTS, model, node, str(status)).inc()
    labelled(DURATION, model).observe(duration)


def observe_stream(model: str, ttft: float | None, mean_gap: float | None) -> None:
    if ttft is not None:
        labelled(TTFT, model).observe(ttft)
    if mean_gap is not None:
        labelled(ITL, model).observe(mean_gap)


def count_retry(model: str, reason: str) -> None:
    labelled(RETRIES, model, reason).inc()


def count_error(kind: str) -> None:
    labelled(ERRORS, kind).inc()


class InflightCollector(Collector):
    """Reads in-flight counts per node at scrape time, so requests pay nothing for this gauge."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
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
