"""Health on request ("probe now", registration) and health as live state: hysteresis, what is
probed, no audit and no configuration bump, history, one prober at a time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from nodes import services
from nodes.choices import BreakerState
from nodes.live import health as live_health
from nodes.live.connection import client as redis_client
from nodes.models import ChangeRecord, Node
from nodes.prober import targets
from nodes.prober.process import Prober
from tests.support.ports import closed_port
from tests.support.procs import REPO_ROOT

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _thresholds(settings) -> None:
    settings.ROUTERPANEL_HEALTH_FAILURES = 2
    settings.ROUTERPANEL_HEALTH_SUCCESSES = 2
    settings.ROUTERPANEL_HEALTH_TIMEOUT = 0.5


def check(node: Node) -> services.HealthReport:
    return services.health_check_nodes(node_ids=[node.pk])


def live_state(node: Node) -> str | None:
    return (live_health.read_states_sync(redis_client()) or {}).get(node.pk)


def test_an_unknown_node_turns_healthy_on_its_first_success(engine_stub, system, redis_url) -> None:
    url, stub = engine_stub
    node = services.node_create(actor=system, url=url, models=["m"])
    report = check(node)
    node.refresh_from_db()
    assert (node.health, live_state(node), report.checked, report.healthy) == ("healthy", "healthy", 1, 1)
    assert stub.calls == ["/health"]


def test_a_failing_node_turns_unhealthy_only_after_n_failures_and_back_after_m_successes(
    engine_stub, system, redis_url
) -> None:
    url, stub = engine_stub
    node = services.node_create(actor=system, url=url, models=["m"], health="healthy")
    stub.health_status = 500
    check(node)
    record = live_health.read_records_sync(redis_client(), [node.pk])[node.pk]
    assert (record.state, record.failures) == ("healthy", 1)
    check(node)
    node.refresh_from_db()
    assert node.health == live_state(node) == "unhealthy"
    stub.health_status = 200
    check(node)
    record = live_health.read_records_sync(redis_client(), [node.pk])[node.pk]
    assert (record.state, record.successes) == ("unhealthy", 1)
    check(node)
    node.refresh_from_db()
    assert node.health == live_state(node) == "healthy"
    assert Node.objects.filter(pk=node.pk).exists()  # marked, never deleted


def test_an_unreachable_node_is_marked_unhealthy(system, redis_url) -> None:
    node = services.node_create(actor=system, url=f"http://127.0.0.1:{closed_port()}", models=["m"], health="healthy")
    check(node)
    report = check(node)
    node.refresh_from_db()
    assert node.health == "unhealthy"
    assert report.transitions and "ClientConnectorError" in report.transitions[0]


def test_a_node_that_never_answered_stays_unknown_and_never_becomes_a_panic_candidate(system, redis_url) -> None:
    node = services.node_create(actor=system, url=f"http://127.0.0.1:{closed_port()}", models=["m"])
    for _ in range(3):
        check(node)
    node.refresh_from_db()
    assert node.health == "unknown"
    record = live_health.read_records_sync(redis_client(), [node.pk])[node.pk]
    assert record.failures == 3 and "ClientConnectorError" in record.detail


def test_health_changes_are_live_state_never_audited_nor_a_configuration_change(engine_stub, system, redis_url) -> None:
    url, stub = engine_stub
    node = services.node_create(actor=system, url=url, models=["m"], health="healthy")
    version = services.config_version_current()
    records = ChangeRecord.objects.count()
    check(node)  # healthy stays healthy
    stub.health_status = 503
    check(node)
    check(node)  # now unhealthy
    node.refresh_from_db()
    assert node.health == live_state(node) == "unhealthy"
    assert services.config_version_current() == version
    assert ChangeRecord.objects.count() == records
    assert node.operator_fields == []


def test_disabled_and_gone_nodes_are_not_probed_on_their_interval(engine_stub, system) -> None:
    url, _ = engine_stub
    active = services.node_create(actor=system, url=url, models=["m"])
    draining = services.node_create(actor=system, url=url + "/draining", models=["m"], state="draining")
    services.node_create(actor=system, url=url + "/disabled", models=["m"], state="disabled")
    services.node_create(actor=system, url=url + "/gone", models=["m"], state="gone")
    assert set(targets.load_targets()) == {active.pk, draining.pk}


def test_probe_settings_come_from_the_node_then_its_control_plane_then_the_settings(system, settings) -> None:
    settings.ROUTERPANEL_HEALTH_INTERVAL = 2.0
    plane = services.control_plane_create(actor=system, name="cp", address="127.0.0.1:1", health_interval=7.0)
    node = services.node_create(actor=system, url="http://a:1", models=["m"], control_plane=plane, health_failures=5)
    loose = services.node_create(actor=system, url="http://b:1", models=["m"], health_timeout=9.0)
    loaded = targets.load_targets()
    assert loaded[node.pk].probe == targets.ProbeSettings(interval=7.0, timeout=0.5, failures=5, successes=2)
    assert loaded[node.pk].url == "http://a:1/health"
    assert loaded[loose.pk].probe.timeout == pytest.approx(2.0 * targets.TIMEOUT_SHARE)  # capped by the interval


def test_probe_results_are_kept_as_bounded_history(engine_stub, system, redis_url, settings) -> None:
    settings.ROUTERPANEL_HEALTH_HISTORY = 3
    url, stub = engine_stub
    node = services.node_create(actor=system, url=url, models=["m"])
    for status in (200, 500, 200, 503):
        stub.health_status = status
        check(node)
    history = live_health.recent_history(redis_client(), node.pk)
    assert [h["detail"] for h in history] == ["HTTP 503", "OK", "HTTP 500"]


async def test_a_second_prober_stands_by_while_the_first_holds_the_lease(redis_url) -> None:
    first = Prober(redis_url, concurrency=4, max_lag=0.2, flush_interval=0.5, history=3, prober_id="first")
    second = Prober(redis_url, concurrency=4, max_lag=0.2, flush_interval=0.5, history=3, prober_id="second")
    try:
        await first._hold_lease()
        await second._hold_lease()
        assert (first.leader, second.leader) == (True, False)
        redis.Redis.from_url(redis_url).delete("routerpanel:prober:lease")  # the first died: its lease expired
        await second._hold_lease()
        assert second.leader
    finally:
        await first.redis.aclose()
        await second.redis.aclose()


def test_probe_now_goes_to_the_running_prober(engine_stub, system, redis_url, monkeypatch) -> None:
    """With a prober's lease in Redis, "probe now" asks it (one writer of the state machine) and
    waits for its record; here a stand-in answers on the prober's channel."""
    url, stub = engine_stub
    node = services.node_create(actor=system, url=url, models=["m"], health="healthy")
    client = redis.Redis.from_url(redis_url)
    client.set("routerpanel:prober:lease", "someone", px=10_000)
    asked: list[list[int]] = []

    def answer(_client, node_ids) -> int:
        asked.append(sorted(node_ids))
        record = live_health.HealthRecord("healthy", 1.0, 0, 9, 0.4, "OK", time.time() + 0.01)
        client.hset("routerpanel:health-records", str(node.pk), live_health.encode(record))
        return 1

    monkeypatch.setattr("nodes.live.health.request_probe", answer)
    report = check(node)
    assert asked == [[node.pk]]
    assert report.records[node.pk].successes == 9
    assert stub.calls == []  # the prober probed, not this process


def test_probe_now_through_the_api(engine_stub, operator_api, system, redis_url) -> None:
    url, _ = engine_stub
    node = services.node_create(actor=system, url=url, models=["m"], state="disabled")
    response = operator_api.post(f"/api/nodes/{node.pk}/probe/")
    assert response.status_code == 200
    assert response.json()["health"] == "healthy"  # "probe now" also probes a disabled node
    assert response.json()["last_checked_at"] is not None


def test_the_admin_probe_action_and_history(engine_stub, client, admin_user, system, redis_url) -> None:
    url, _ = engine_stub
    node = services.node_create(actor=system, url=url, models=["m"])
    client.force_login(admin_user)
    response = client.post("/admin/nodes/node/", {"action": "probe_nodes", "_selected_action": [node.pk]}, follow=True)
    assert "healthy" in response.content.decode()
    page = client.get(f"/admin/nodes/node/{node.pk}/change/").content.decode()
    assert "recent probes" in page.lower() and "<td>OK</td>" in page


def test_no_celery_task_probes_the_nodes_the_prober_process_does(settings) -> None:
    assert all("health" not in entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values())
    procfile = (Path(REPO_ROOT) / "Procfile").read_text()
    assert "manage.py run_prober" in procfile


def test_the_admin_shows_each_nodes_circuit_breaker(client, admin_user, system, redis_url) -> None:
    open_node = services.node_create(actor=system, url="http://a:1", models=["m"])
    half_open_node = services.node_create(actor=system, url="http://c:1", models=["m"])
    services.node_create(actor=system, url="http://b:1", models=["m"])
    for node, state in ((open_node, "open"), (half_open_node, "half_open")):
        redis.Redis.from_url(redis_url).hset(
            "routerpanel:breakers", str(node.pk), json.dumps({"state": state, "until": time.time() + 60, "at": 1})
        )
    client.force_login(admin_user)
    html = client.get("/admin/nodes/node/").content.decode()
    # Each state in its colour with its label, as the dashboard shows it (nodes.choices.BreakerState).
    for state, label in (("open", "Open"), ("half_open", "Half-open"), ("closed", "Closed")):
        assert html.count(f'background:{BreakerState.colour(state)}">{label}</span>') == 1, state


async def test_a_prober_that_lost_its_lease_forgets_what_it_knew_and_starts_over_from_redis(redis_url) -> None:
    from nodes.prober.hysteresis import HealthState
    from nodes.prober.targets import ProbeSettings, Target

    prober = Prober(redis_url, concurrency=4, max_lag=0.2, flush_interval=0.5, history=3, prober_id="first")
    try:
        prober.core.seed(1, HealthState("unhealthy"))
        prober.core.set_targets({1: Target(1, "http://a:1/health", ProbeSettings(5.0, 1.0, 2, 2), True)}, 0.0)
        prober.core.stand_by()
        assert (prober.core.states, prober.core.targets, 1 in prober.core.schedule) == ({}, {}, False)
    finally:
        await prober.redis.aclose()
