"""The prober's rules, with a fake clock: when it probes (spread, jitter, no bursts, no catching up),
what a result says given the prober's own lateness, and the hysteresis."""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict

import pytest

from nodes.prober.hysteresis import FAIL, OK, VOID, HealthState, advance
from nodes.prober.schedule import Schedule
from nodes.prober.verdicts import CONNECT, GOOD, HTTP_STATUS, LATE, OWN, TIMEOUT, LoopLag, ProbeResult, judge


def run(schedule: Schedule, start: float, end: float, step: float = 0.01) -> list[tuple[float, int]]:
    """Advance a fake clock from ``start`` to ``end``; returns (time, node id) of every probe sent."""
    sent = []
    now = start
    while now < end:
        sent += [(now, slot.node_id) for slot in schedule.pop_due(now)]
        now += step
    return sent


# -- the schedule ----------------------------------------------------------------------------


def test_a_thousand_nodes_placed_together_are_probed_evenly_not_in_bursts() -> None:
    schedule = Schedule(jitter=0.1, rng=random.Random(7))
    schedule.place([(node_id, 5.0) for node_id in range(1000)], now=0.0)
    sent = run(schedule, 0.0, 30.0)
    per_bucket = Counter(int(t * 10) for t, _ in sent if 1.0 <= t < 30.0)  # probes per 100 ms
    expected = 1000 / 5.0 / 10  # 20
    assert len(per_bucket) == 290  # no 100 ms window without a probe
    assert max(per_bucket.values()) <= 2 * expected
    assert min(per_bucket.values()) >= expected / 3


def test_each_node_keeps_its_interval_within_the_jitter_and_on_average_exactly() -> None:
    schedule = Schedule(jitter=0.1, rng=random.Random(3))
    schedule.place([(node_id, 5.0) for node_id in range(100)], now=0.0)
    times: dict[int, list[float]] = defaultdict(list)
    for t, node_id in run(schedule, 0.0, 200.0):
        times[node_id].append(t)
    gaps = [b - a for series in times.values() for a, b in itertools.pairwise(series)]
    assert min(gaps) >= 4.0 - 0.02 and max(gaps) <= 6.0 + 0.02  # ±10% each way, never accumulated
    assert sum(gaps) / len(gaps) == pytest.approx(5.0, abs=0.05)
    for series in times.values():  # no drift: 40 intervals later each node is still on its phase
        assert (series[-1] - series[0]) / (len(series) - 1) == pytest.approx(5.0, abs=0.03)


def test_a_new_node_is_probed_at_once_and_many_new_ones_at_a_bounded_rate() -> None:
    schedule = Schedule(rng=random.Random(1))
    schedule.add_now(1, 5.0, now=10.0)
    assert [s.node_id for s in schedule.pop_due(10.0)] == [1]
    schedule.place([(node_id, 5.0) for node_id in range(100, 600)], now=20.0, within=1.0)
    sent = [(t, node_id) for t, node_id in run(schedule, 20.0, 21.01) if node_id >= 100]
    assert len(sent) == 500 and max(t for t, _ in sent) <= 21.0 + 0.01  # one step of the fake clock


def test_a_prober_that_fell_behind_drops_the_missed_slots_instead_of_bursting_them() -> None:
    schedule = Schedule(jitter=0.0)
    schedule.place([(node_id, 1.0) for node_id in range(10)], now=0.0)
    assert len(schedule.pop_due(5.5)) == 10  # five intervals late: one probe per node, not five
    assert schedule.pop_due(5.5) == []
    next_time = schedule.next_time()
    assert next_time is not None and 5.5 < next_time <= 6.5


def test_an_interval_change_takes_effect_within_the_new_interval_and_a_removed_node_is_forgotten() -> None:
    schedule = Schedule(jitter=0.0)
    schedule.place([(1, 60.0), (2, 60.0)], now=0.0)
    schedule.set_interval(1, 2.0, now=0.0)
    schedule.remove(2)
    sent = run(schedule, 0.0, 10.0)
    assert {node_id for _, node_id in sent} == {1}
    assert len(sent) >= 4
    assert 2 not in schedule


# -- the verdicts ----------------------------------------------------------------------------


def result(kind: str, *, sent: float = 10.0, finished: float = 10.5, timeout: float = 0.5, due: float = 10.0):
    return ProbeResult(1, kind, "detail", due, sent, finished, timeout, 1_000.0)


def lag_with(*stalls: tuple[float, float], last_sample: float = 11.0) -> LoopLag:
    """A loop monitor that saw these (wake-up time, lag) stalls, and woke last at ``last_sample``."""
    lag = LoopLag(tick=0.025)
    for at, seconds in stalls:
        lag.record(at, seconds)
    lag.record(last_sample, 0.0)
    return lag


def test_a_good_answer_counts_even_when_the_prober_stalled() -> None:
    assert judge(result(GOOD), lag_with((10.4, 2.0)), max_lag=0.2) == (OK, "detail")


def test_a_probe_the_prober_sent_late_decides_nothing() -> None:
    assert judge(result(LATE), lag_with(), max_lag=0.2)[0] == VOID


def test_the_probers_own_resource_trouble_decides_nothing() -> None:
    assert judge(result(OWN), lag_with(), max_lag=0.2)[0] == VOID


@pytest.mark.parametrize(
    ("stalls", "finished", "verdict"),
    [
        ((), 10.5, FAIL),  # a quiet loop: the engine did not answer
        (((10.3, 0.05),), 10.5, FAIL),  # a short stall cannot explain a timeout
        (((10.45, 0.4),), 10.5, VOID),  # the loop stalled 400 ms while waiting: maybe it was us
        (((10.9, 0.9),), 10.9, VOID),  # a stall that began during the probe and made its timer fire late
        (((9.0, 0.5),), 10.5, FAIL),  # a stall long before the probe says nothing about it
        (((12.0, 0.5),), 10.5, FAIL),  # nor one after it
        ((), 10.9, VOID),  # the timer fired 400 ms after its time
    ],
)
def test_a_timeout_the_probers_own_stall_could_explain_decides_nothing(stalls, finished, verdict) -> None:
    assert judge(result(TIMEOUT, finished=finished), lag_with(*stalls, last_sample=13.0), max_lag=0.2)[0] == verdict


def test_a_refusal_or_an_error_status_is_the_engines_whatever_the_prober_went_through() -> None:
    stalled = lag_with((10.45, 0.4))
    assert judge(result(CONNECT), stalled, max_lag=0.2)[0] == FAIL
    assert judge(result(HTTP_STATUS), stalled, max_lag=0.2)[0] == FAIL


def test_a_timeout_waits_until_the_loop_monitor_has_woken_after_it() -> None:
    assert judge(result(TIMEOUT, finished=10.5), lag_with(last_sample=10.49), max_lag=0.2) is None


def test_the_loop_monitor_reports_its_lag_and_forgets_old_stalls() -> None:
    lag = LoopLag(tick=0.025, keep=60.0)
    for i in range(100):
        lag.record(float(i), 0.001)
    lag.record(100.0, 0.5)
    assert lag.figures()["max_ms"] == 500.0
    assert lag.max_stall(99.5, 100.0) == 0.5
    lag.record(200.0, 0.0)
    assert lag.max_stall(99.5, 100.0) == 0.0  # older than ``keep``


# -- the hysteresis --------------------------------------------------------------------------


def walk(state: HealthState, verdicts: str, failures: int = 2, successes: int = 2) -> list[str]:
    states = []
    for step, letter in enumerate(verdicts):
        verdict = {"o": OK, "f": FAIL, "v": VOID}[letter]
        state = advance(state, verdict, failures=failures, successes=successes, now=float(step))
        states.append(state.state)
    return states


def test_a_healthy_node_turns_unhealthy_after_n_failures_in_a_row_and_back_after_m_successes() -> None:
    states = walk(HealthState("healthy"), "fofffooo")
    assert states == ["healthy", "healthy", "healthy", "unhealthy", "unhealthy", "unhealthy", "healthy", "healthy"]


def test_void_verdicts_change_nothing_not_even_the_counters() -> None:
    assert walk(HealthState("healthy"), "fvvvf") == ["healthy"] * 4 + ["unhealthy"]
    assert walk(HealthState("unhealthy"), "ovvvvo") == ["unhealthy"] * 5 + ["healthy"]


def test_a_node_never_probed_joins_at_its_first_success_and_stays_unknown_while_it_fails() -> None:
    assert walk(HealthState(), "ffffo") == ["unknown"] * 4 + ["healthy"]


def test_a_transition_records_when_it_happened() -> None:
    state = advance(HealthState("healthy", since=1.0), FAIL, failures=1, successes=1, now=42.0)
    assert (state.state, state.since) == ("unhealthy", 42.0)
    assert advance(state, FAIL, failures=1, successes=1, now=50.0).since == 42.0
