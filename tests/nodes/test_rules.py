"""The routing rules as pure functions: routable, healthy, serving mode, readiness."""

from __future__ import annotations

import pytest

from nodes import rules
from nodes.live.breakers import BreakerRecord, decode, encode, parse_breakers


@pytest.mark.parametrize(
    ("state", "health", "routable"),
    [
        ("active", "healthy", True),
        ("active", "unknown", False),  # never probed: it serves after its first good probe
        ("active", "unhealthy", False),
        ("pending", "healthy", False),  # waits for an operator's approval
        ("draining", "healthy", False),
        ("disabled", "healthy", False),
        ("gone", "healthy", False),
    ],
)
def test_a_node_is_routable_when_active_and_its_last_probe_said_healthy(state, health, routable) -> None:
    assert rules.is_routable(state, health) is routable


@pytest.mark.parametrize(
    ("routable", "health", "breaker", "healthy"),
    [
        (True, "healthy", None, True),
        (True, "healthy", "closed", True),
        (True, "healthy", "half_open", True),
        (True, "healthy", "open", False),
        (True, "unknown", None, False),
        (False, "healthy", None, False),
    ],
)
def test_only_probed_healthy_routable_nodes_without_an_open_breaker_count_for_readiness(
    routable, health, breaker, healthy
) -> None:
    assert rules.is_healthy(routable=routable, health=health, breaker=breaker) is healthy


@pytest.mark.parametrize(
    ("configured", "routable", "has_split_nodes", "mode"),
    [
        ("pd", {"hybrid": 3}, False, "pd"),
        ("hybrid", {"prefill": 1, "decode": 1}, True, "hybrid"),
        ("auto", {"prefill": 1, "decode": 1, "hybrid": 1}, True, "pd"),
        ("auto", {"prefill": 1, "hybrid": 1}, True, "hybrid"),
        ("auto", {"prefill": 1}, True, "pd"),  # no hybrid node: the 503 names the missing role
        ("auto", {}, True, "pd"),
        ("auto", {}, False, "hybrid"),
    ],
)
def test_the_serving_mode_follows_the_policy_and_the_routable_nodes(configured, routable, has_split_nodes, mode):
    assert rules.serving_mode(configured, routable=routable, has_split_nodes=has_split_nodes) == mode


def test_a_model_is_ready_when_every_role_it_needs_has_a_healthy_node() -> None:
    assert rules.readiness("pd", {"prefill": 2, "decode": 1}) == rules.Readiness(
        ready=True, mode="pd", healthy_nodes={"prefill": 2, "decode": 1}, reasons=[]
    )
    not_ready = rules.readiness("pd", {"prefill": 1, "hybrid": 4})
    assert not not_ready.ready
    assert not_ready.healthy_nodes == {"prefill": 1, "decode": 0}
    assert not_ready.reasons == ["no healthy decode node"]
    assert rules.readiness("hybrid", {}).reasons == ["no healthy hybrid node"]


def test_a_breaker_record_survives_its_codec_and_shows_half_open_after_its_cool_down() -> None:
    record = BreakerRecord(state="open", until=1500.0, at=1000.0)
    assert decode(encode(record)) == record
    assert decode(b"not json") is None
    assert decode(b"[1, 2]") is None
    assert parse_breakers({b"7": encode(record)}, now=1400.0) == {7: "open"}
    assert parse_breakers({b"7": encode(record)}, now=1600.0) == {7: "half_open"}


@pytest.mark.parametrize(
    ("nodes", "threshold", "members", "panic"),
    [
        ([("active", "healthy"), ("active", "unhealthy")], 0.5, (0,), False),
        ([("active", "healthy"), ("active", "unhealthy"), ("active", "unhealthy")], 0.5, (0, 1, 2), True),
        ([("active", "unhealthy")], 0.5, (0,), True),  # none pass: all rather than none
        ([("active", "unhealthy")], 0.0, (), False),  # 0 turns it off
        ([("active", "unknown"), ("active", "unhealthy")], 0.5, (1,), True),  # never probed: never in
        ([("draining", "unhealthy"), ("disabled", "healthy")], 0.5, (), False),  # not active: never in
    ],
)
def test_below_the_panic_threshold_a_role_routes_to_its_routable_and_once_healthy_nodes(
    nodes, threshold, members, panic
) -> None:
    result = rules.rotation(nodes, threshold)
    assert (result.members, result.panic) == (members, panic)
    assert result.routable == sum(1 for state, health in nodes if rules.is_routable(state, health))


def test_readiness_reports_panic_without_counting_sick_nodes_as_healthy() -> None:
    result = rules.readiness("hybrid", {"hybrid": 0}, {"hybrid": 3})
    assert (result.ready, result.panic, result.reasons) == (False, {"hybrid": 3}, ["no healthy hybrid node"])
    assert rules.panic_label("hybrid", 3) == "panic: routing to all 3 hybrid nodes"
