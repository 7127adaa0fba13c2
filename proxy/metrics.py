"""Prometheus metrics of the data path (served at ``/metrics``).

Label sets are bounded: ``model`` is a route name from the snapshot (or ``"-"`` before one is
known), ``node`` a node URL from the snapshot (or ``"-"``), ``status`` an HTTP status, ``kind``
one of the error codes the proxy emits. Metrics are per process (one scrape target per web worker).

The metrics every request or stream updates (``LocalCounter``, ``LocalHistogram``) are plain
dictionaries on the event loop, turned into samples when ``/metrics`` is scraped: one dict update
and one ``bisect`` per observation, where prometheus_client's labelled children take a lock and a
few calls each. The rare ones (retries, errors) are prometheus_client metrics, their labelled
children cached so that an update is one dict lookup.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class LocalCounter(Collector):
    """A labelled counter kept in a dict (see the module doc). Label values may be any objects
    whose ``str`` is the label (an int status, say): converted at scrape time, not per request."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.label_names = list(labels)
        self.values: dict[tuple[object, ...], float] = {}
        REGISTRY.register(self)

    def inc(self, *labels: object) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + 1

    def add(self, amount: float, *labels: object) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.label_names)
        for labels, value in list(self.values.items()):
            family.add_metric([str(label) for label in labels], value)
        yield family


class LocalHistogram(Collector):
    """A labelled histogram kept in a dict: per label set, the count per bucket then the sum."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.label_names = list(labels)
        self.bounds = tuple(float(b) for b in buckets)  # +Inf is the last bucket, implicitly
        self.values: dict[tuple[str, ...], list[float]] = {}
        REGISTRY.register(self)

    def observe(self, value: float, *labels: str) -> None:
        counts = self.values.get(labels)
        if counts is None:
            counts = self.values[labels] = [0.0] * (len(self.bounds) + 2)
        counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
        counts[-1] += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)
        bounds = [*(_le(b) for b in self.bounds), "+Inf"]
        for labels, counts in list(self.values.items()):
            cumulative = 0.0
            buckets = []
            for bound, count in zip(bounds, counts, strict=False):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(labels), buckets, counts[-1])
        yield family


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes it (``1.0``, ``0.005``, ``+Inf``)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


REQUESTS = LocalCounter(
    "routerpanel_proxy_requests", "Proxied requests by model, node and response status.", ["model", "node", "status"]
)
DURATION = LocalHistogram(
    "routerpanel_proxy_request_duration_seconds",
    "Time from request to the end of the response.",
    ["model"],
    LATENCY_BUCKETS,
)
TTFT = LocalHistogram(
    "routerpanel_proxy_time_to_first_token_seconds",
    "Time from request to the first streamed chunk.",
    ["model"],
    LATENCY_BUCKETS,
)
ITL = LocalHistogram(
    "routerpanel_proxy_inter_token_latency_seconds",
    "Mean gap between streamed chunks, one sample per stream.",
    ["model"],
    _ITL_BUCKETS,
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
    REQUESTS.inc(model, node, status)
    DURATION.observe(duration, model)


def observe_stream(model: str, ttft: float | None, mean_gap: float | None) -> None:
    if ttft is not None:
        TTFT.observe(ttft, model)
    if mean_gap is not None:
        ITL.observe(mean_gap, model)


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
