"""A node's health state machine: what one probe's verdict does to it (pure, no I/O, no clock).

- ``unknown`` (never probed, or never answered): turns ``healthy`` on its first success. Failures
  keep it ``unknown``: a node that never passed a probe is not known to be an engine at all, so it
  must not become a panic candidate (``nodes.rules.is_panic_candidate``).
- ``healthy`` turns ``unhealthy`` after ``failures`` failed probes in a row.
- ``unhealthy`` turns ``healthy`` after ``successes`` good probes in a row.
- A void verdict (the probe said nothing about the node: it was late, or the prober's own trouble
  may explain its failure; see ``nodes.prober.verdicts``) changes nothing, not even the counters.

A node is marked, never deleted: deleting flapped against the registry re-adding it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..choices import NodeHealth

OK, FAIL, VOID = "ok", "fail", "void"

HEALTHY, UNHEALTHY, UNKNOWN = NodeHealth.HEALTHY.value, NodeHealth.UNHEALTHY.value, NodeHealth.UNKNOWN.value


@dataclass(frozen=True, slots=True)
class HealthState:
    state: str = UNKNOWN
    failures: int = 0  # consecutive failed probes
    successes: int = 0  # consecutive good probes
    since: float = 0.0  # wall-clock time of the last transition


def advance(current: HealthState, verdict: str, *, failures: int, successes: int, now: float) -> HealthState:
    """The state after one probe's ``verdict`` (``OK``, ``FAIL`` or ``VOID``), with the node's
    thresholds ``failures`` and ``successes``."""
    if verdict == OK:
        count = current.successes + 1
        state = current.state
        if state == UNKNOWN or (state == UNHEALTHY and count >= successes):
            state = HEALTHY
        return _moved(current, state, failures=0, successes=count, now=now)
    if verdict == FAIL:
        count = current.failures + 1
        state = current.state
        if state == HEALTHY and count >= failures:
            state = UNHEALTHY
        return _moved(current, state, failures=count, successes=0, now=now)
    return current


def _moved(current: HealthState, state: str, *, failures: int, successes: int, now: float) -> HealthState:
    since = now if state != current.state else current.since
    return replace(current, state=state, failures=failures, successes=successes, since=since)
