"""What a probe's result says about its node, given what the prober knows about its own trouble.

The prober must never eject a healthy node because it was itself slow: an event loop that stalls
(CPU starved by other processes, a long callback, a GC pause) fires a probe's timeout late, or
fires it while the engine's answer sits unread in the socket buffer, and the probe "fails" although
the engine answered in a millisecond. That is how a busy checker flapped healthy nodes.

So the prober watches its own loop (``LoopLag``: a monitor task that sleeps ``tick`` and records
how late it woke), and ``judge`` gives each result a verdict:

- ``VOID`` when the probe was never sent because it was due more than ``max_lag`` ago (the prober
  ran late; a late round decides nothing), or failed for the prober's own reasons (out of file
  descriptors or ports), or timed out while the prober's loop stalled longer than ``max_lag`` at
  some point of the probe's life, or its timeout fired more than ``max_lag`` late.
- ``OK`` for a good answer (a stall cannot make an engine answer).
- ``FAIL`` otherwise: an error status, a refused or reset connection, a timeout the prober cannot
  explain by its own trouble.

A failure is judged only once the monitor has woken after the probe ended, so a stall that was
still going on when the timeout fired is seen. Everything takes the loop's clock as numbers, so
tests drive it without a loop.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from .hysteresis import FAIL, OK, VOID

# Result kinds.
GOOD = "ok"
HTTP_STATUS = "http"  # answered with a status other than 200
TIMEOUT = "timeout"
CONNECT = "connect"  # refused, reset, disconnected, unreachable
OWN = "own"  # the prober's own resources failed (EMFILE, EADDRNOTAVAIL, ...)
LATE = "late"  # not sent: due too long ago


@dataclass(frozen=True, slots=True)
class ProbeResult:
    node_id: int
    kind: str
    detail: str
    due: float  # loop time the probe was due
    sent: float  # loop time it was sent (``due`` plus the dispatch lateness)
    finished: float  # loop time its result was in
    timeout: float  # the probe's timeout, seconds
    wall: float  # wall-clock time its result was in
    latency_ms: float | None = None  # for a good or error-status answer


class LoopLag:
    """The prober's event loop as its monitor saw it: how late each wake-up came."""

    def __init__(self, *, tick: float = 0.025, keep: float = 120.0, stall_above: float = 0.01) -> None:
        self.tick = tick
        self.keep = keep
        self.stall_above = stall_above
        self.last_sample = float("-inf")  # loop time of the monitor's latest wake-up
        self._stall_ends: list[float] = []  # loop times the recorded stalls ended (ascending)
        self._stall_lags: list[float] = []
        self._recent: deque[tuple[float, float]] = deque()  # (time, lag) of every wake-up in the window

    def record(self, now: float, lag: float, *, window: float = 10.0) -> None:
        """One wake-up of the monitor at ``now``, ``lag`` seconds after it was due."""
        self.last_sample = now
        self._recent.append((now, lag))
        while self._recent and self._recent[0][0] < now - window:
            self._recent.popleft()
        if lag > self.stall_above:
            self._stall_ends.append(now)
            self._stall_lags.append(lag)
        if self._stall_ends and self._stall_ends[0] < now - self.keep:
            cut = bisect.bisect_left(self._stall_ends, now - self.keep)
            del self._stall_ends[:cut], self._stall_lags[:cut]

    def max_stall(self, start: float, end: float) -> float:
        """The longest stall that overlapped ``[start, end]``. A wake-up ``lag`` late at ``t`` means
        the loop was unavailable for about ``[t - lag - tick, t]`` (the lag understates a block by
        up to one tick)."""
        longest = 0.0
        first = bisect.bisect_left(self._stall_ends, start)
        for index in range(first, len(self._stall_ends)):
            ended, lag = self._stall_ends[index], self._stall_lags[index]
            if ended - lag - self.tick > end:
                break  # stalls never overlap (the monitor woke between any two): later ones start later
            longest = max(longest, lag)
        return longest

    def figures(self) -> dict[str, float]:
        """The loop's lag over the recent window, in milliseconds: median, 99th percentile, max."""
        lags = sorted(lag for _, lag in self._recent)
        if not lags:
            return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
        return {
            "p50_ms": round(lags[len(lags) // 2] * 1000, 2),
            "p99_ms": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000, 2),
            "max_ms": round(lags[-1] * 1000, 2),
        }


def judge(result: ProbeResult, lag: LoopLag, *, max_lag: float) -> tuple[str, str] | None:
    """``(verdict, reason)`` for ``result``; None when it cannot be judged yet (the loop monitor has
    not woken since the probe ended)."""
    if result.kind == LATE:
        return VOID, result.detail
    if result.kind == OWN:
        return VOID, f"the prober's own trouble: {result.detail}"
    if result.kind == GOOD:
        return OK, result.detail
    if result.kind == TIMEOUT:
        if lag.last_sample < result.finished:
            return None
        fired_late = result.finished - (result.sent + result.timeout)
        if fired_late > max_lag:
            return VOID, f"timeout fired {fired_late * 1000:.0f} ms late (prober overloaded)"
        stall = lag.max_stall(result.sent, result.finished)
        if stall > max_lag:
            return VOID, f"timed out while the prober's loop stalled {stall * 1000:.0f} ms"
    return FAIL, result.detail
