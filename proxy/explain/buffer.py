"""This worker's finished explanations: packed at the request's end, buffered, and appended to the
Redis stream in batches by the worker's background loop (``proxy.explain`` says why so)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from prometheus_client import Counter

from nodes.live import explain as live

from .record import Explanation

if TYPE_CHECKING:
    from ..errors import ProxyError
    from ..request import Outcome
    from ..snapshot import KeyView

logger = logging.getLogger(__name__)

DROPPED = Counter(
    "routerpanel_explain_dropped",
    "Request explanations dropped: the buffer was full, Redis failed, or the record could not be packed.",
    ["why"],
)
STORED = Counter("routerpanel_explain_stored", "Request explanations appended to Redis.")


class Explainer:
    """This worker's explanations: starts them, buffers the finished ones, flushes them to Redis."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        retention: float = 3600.0,
        max_records: int = 50_000,
        buffer_size: int = 10_000,
        flush_interval: float = 1.0,
        batch: int = 500,
    ) -> None:
        self.enabled = enabled
        self.retention = retention
        self.max_records = max_records
        self.buffer_size = buffer_size
        self.flush_interval = flush_interval
        self.batch = batch
        self.buffer: list[bytes] = []  # packed records waiting for the flush (``finish``)
        self.ids: list[str] = []  # their request ids, in the same order
        self.dropped = 0  # records lost: the buffer was full (Redis away) or a flush failed
        self.stored = 0
        self._flushed_at = 0.0

    def begin(
        self, request_id: str, key: KeyView | None, model: str, path: str, stream: bool, started: float, header: bool
    ) -> Explanation | None:
        """An explanation for a request, or None when explanations are off and the client did not
        ask for the summary."""
        if not (self.enabled or header):
            return None
        return Explanation(request_id, key, model, path, stream, started, header)

    def refused(self, explanation: Explanation, exc: ProxyError) -> None:
        """The request was refused before any node was chosen (unknown model, the key's limits):
        finish its record, and add the summary to the error's headers if the client asked."""
        explanation.status, explanation.error = exc.status, exc.code
        explanation.not_allowed = exc.code == "model_not_allowed"
        exc.headers += explanation.failed(exc)
        self.finish(explanation, None)

    def finish(self, explanation: Explanation, outcome: Outcome | None) -> None:
        """The request ended (``outcome`` None: refused before it was sent anywhere): note how, and
        buffer the record for the next flush."""
        explanation.total = time.perf_counter() - explanation.started
        if outcome is not None:
            explanation.status, explanation.error = outcome.status, outcome.error
            if outcome.node != "-":
                explanation.answered_by = outcome.node
            if outcome.usage:
                explanation.usage = live.usage_slice(outcome.usage)
        if not self.enabled:
            return
        if len(self.buffer) >= self.buffer_size:
            self.dropped += 1
            DROPPED.labels("buffer_full").inc()
            return
        try:
            record = live.encode(explanation.wire())
        except Exception:  # a record this code cannot pack costs the record, never the request
            logger.debug("could not pack the explanation of %s", explanation.request_id, exc_info=True)
            self.dropped += 1
            DROPPED.labels("unpackable").inc()
            return
        self.ids.append(explanation.request_id)
        self.buffer.append(record)

    def due(self, now: float | None = None) -> bool:
        """Whether the loop should flush now: a full batch waits, or the interval passed.

        Batches are small (``batch``, 500) and the loop flushes every full one at each of its ticks:
        what a flush holds at once (the records, their wire form, the packed argument) is the web
        worker's peak memory, and 2,000 records at a time added about 2 MB to it under load."""
        if not self.buffer:
            return False
        now = time.monotonic() if now is None else now
        return len(self.buffer) >= self.batch or now - self._flushed_at >= self.flush_interval

    async def flush(self, client: aioredis.Redis) -> int:
        """Append up to one batch to the stream; returns how many. A failure drops (and counts) the
        batch and raises, so the loop backs off as for any Redis error."""
        batch, self.buffer = self.buffer[: self.batch], self.buffer[self.batch :]
        ids, self.ids = self.ids[: self.batch], self.ids[self.batch :]
        self._flushed_at = time.monotonic()
        records = list(zip(ids, batch, strict=True))
        oldest_ms = int((time.time() - self.retention) * 1000)
        try:
            await client.eval(*live.append_args(records, max_records=self.max_records, oldest_ms=oldest_ms))
        except BaseException:
            self.dropped += len(batch)
            DROPPED.labels("redis").inc(len(batch))
            raise
        self.stored += len(batch)
        STORED.inc(len(batch))
        return len(batch)
