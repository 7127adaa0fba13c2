"""Request counters and the bounded log of recent requests (``GET /sim/stats``, ``GET /sim/requests``)."""

from __future__ import annotations

import json
import time
from collections import Counter, deque

from enginesim.http import Request
from enginesim.shapes import RecordedRequest, RequestCounters


class RequestStats:
    """Counters of everything but ``/sim/*``. ``cancelled`` counts requests the client abandoned."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Zero every counter but ``in_flight`` (``POST /sim/reset``): requests still running decrement it."""
        self.total = 0
        self.by_endpoint: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()
        self.by_dp_rank: Counter[str] = Counter()
        self.completed = 0
        self.cancelled = 0
        self.aborted = 0
        self.faults_injected = 0

    def snapshot(self) -> RequestCounters:
        return {
            "total": self.total,
            "by_endpoint": dict(self.by_endpoint),
            "by_status": dict(self.by_status),
            "by_dp_rank": dict(self.by_dp_rank),
            "in_flight": self.in_flight,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "aborted": self.aborted,
            "faults_injected": self.faults_injected,
        }


class RequestLog:
    """The last ``size`` requests, kept raw and decoded only when someone reads them."""

    def __init__(self, size: int) -> None:
        self.entries: deque[tuple[int, float, Request]] = deque(maxlen=max(0, size))
        self.seq = 0

    def record(self, request: Request) -> None:
        self.seq += 1
        self.entries.append((self.seq, time.time(), request))

    def clear(self) -> None:
        self.entries.clear()

    def snapshot(self, limit: int | None = None) -> list[RecordedRequest]:
        items = list(self.entries)
        if limit is not None:
            items = items[-limit:] if limit > 0 else []
        return [self._describe(seq, at, r) for seq, at, r in items]

    @staticmethod
    def _describe(seq: int, at: float, request: Request) -> RecordedRequest:
        headers: dict[str, str] = {}
        for name, value in request.headers:
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        text = request.body.decode("utf-8", "replace")
        try:
            body = json.loads(request.body) if request.body else None
            body_text = None
        except ValueError:
            body, body_text = None, text
        return {
            "seq": seq,
            "time": at,
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": headers,
            "body": body,
            "body_text": body_text,
        }
