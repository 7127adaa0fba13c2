"""In-flight request counters and observed latency per node, and per-key limits.

The classes here count in this process; ``proxy.shared`` extends them so that every worker on every
host counts the others' requests too, through Redis. Everything outside these modules talks to the
``LoadTracker`` protocol only, and its hot-path methods are synchronous and O(1): the shared tracker
keeps a local view (its own counts plus the other workers' as of the last sync) and publishes its
own counts in the background.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Protocol

from .snapshot import KeyView, NodeView

# Weight of the newest sample in the latency moving average.
LATENCY_ALPHA = 0.2


class LoadTracker(Protocol):
    def inflight(self, node_id: int) -> int: ...

    def latency(self, node_id: int) -> float: ...

    def has_capacity(self, node: NodeView) -> bool: ...

    def try_acquire(self, node: NodeView) -> bool: ...

    def release(self, node_id: int, elapsed: float | None = None) -> None: ...

    def counts(self) -> dict[int, int]: ...

    def limited(self) -> Collection[int]: ...


class LocalLoadTracker:
    """Counters in this process's memory. Single event loop, so no locking is needed."""

    def __init__(self) -> None:
        self._inflight: dict[int, int] = {}
        self._latency: dict[int, float] = {}
        self._limited: set[int] = set()  # nodes with a concurrency limit and requests in flight here

    def inflight(self, node_id: int) -> int:
        return self._inflight.get(node_id, 0)

    def latency(self, node_id: int) -> float:
        """Moving average of recent request durations in seconds (0.0 before the first sample)."""
        return self._latency.get(node_id, 0.0)

    def has_capacity(self, node: NodeView) -> bool:
        return node.max_concurrency == 0 or self._inflight.get(node.id, 0) < node.max_concurrency

    def try_acquire(self, node: NodeView) -> bool:
        count = self._inflight.get(node.id, 0)
        if node.max_concurrency and count >= node.max_concurrency:
            return False
        self._inflight[node.id] = count + 1
        if node.max_concurrency:
            self._limited.add(node.id)
        return True

    def release(self, node_id: int, elapsed: float | None = None) -> None:
        count = self._inflight.get(node_id, 0) - 1
        if count > 0:
            self._inflight[node_id] = count
        else:
            self._inflight.pop(node_id, None)
            self._limited.discard(node_id)
        if elapsed is not None:
            previous = self._latency.get(node_id)
            self._latency[node_id] = elapsed if previous is None else previous + LATENCY_ALPHA * (elapsed - previous)

    def counts(self) -> dict[int, int]:
        return dict(self._inflight)

    def limited(self) -> Collection[int]:
        """The only nodes that can be at their concurrency limit: those with one and requests in
        flight (what a request's explanation looks at instead of the whole route, ``proxy.explain``)."""
        return self._limited


class KeyLimiter:
    """Per-API-key requests-per-minute (fixed one-minute windows) and concurrency, in this process.

    ``proxy.shared.SharedKeyLimiter`` adds the other workers' counts, so a limit holds across every
    worker; this class alone (tests, or shared counters turned off) limits per web worker.
    """

    def __init__(self) -> None:
        self._window: dict[int, tuple[int, int]] = {}  # key id -> (minute, requests in it)
        self._active: dict[int, int] = {}

    def try_acquire(self, key: KeyView, now: float | None = None) -> str | None:
        """Count a request for ``key``; returns the name of the exceeded limit, or None if allowed."""
        if key.max_concurrent is not None and self._active.get(key.id, 0) >= key.max_concurrent:
            return "max_concurrent"
        if key.rate_limit_rpm is not None:
            minute = int((time.monotonic() if now is None else now) // 60)
            window, used = self._window.get(key.id, (minute, 0))
            if window != minute:
                used = 0
            if used >= key.rate_limit_rpm:
                return "rate_limit_rpm"
            self._window[key.id] = (minute, used + 1)
        self._active[key.id] = self._active.get(key.id, 0) + 1
        return None

    def release(self, key: KeyView) -> None:
        count = self._active.get(key.id, 0) - 1
        if count > 0:
            self._active[key.id] = count
        else:
            self._active.pop(key.id, None)

    def active(self, key_id: int) -> int:
        return self._active.get(key_id, 0)

    def retry_after(self, now: float | None = None) -> int:
        """Seconds until the current one-minute window ends."""
        now = time.monotonic() if now is None else now
        return max(1, 60 - int(now % 60))
