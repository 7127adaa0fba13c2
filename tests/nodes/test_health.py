"""Active health checks: hysteresis, what is probed, audit, history, the single-runner lock."""

from __future__ import annotations

import json
import time

import pytest
import redis

from nodes import health, services
from nodes.choices import BreakerState
from nodes.models import ChangeRecord, Node
from tests.procs import free_port

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _thresholds(settings) -> None:
    settings.ROUTERPANEL_HEALTH_FAILURES = 2
    settings.ROUTERPANEL_HEALTH_SUCCESSES = 2
    settings.ROUTERPANEL_HEALTH_TIMEOUT = 0.5


def check() -> health.HealthReport:
    return services.health_check_nodes()


def test_an_unknown_node_turns_healthy_on_its_first_success(engine_stub, system, redis_url) -> None:
    url, stub = engine_stub
    node = services.node_create(actor=system, url=url, models=["m"])
    report = check()
    node.refresh_from_db()
    assert (node.health, report.checked, report.healthy) == ("healthy", 1, 1)
    assert stub.calls == ["/health"]


def test_a_failing_node_turns_unhealthy_only_after_n_failures_and_back_after_m_successes(
    engine_stub, system, redis_url
) -> None:
    url, stub = engine_stub
    node = services.node_create(actor=system, url=url, models=["m"], health="healthy")
    stub.health_status = 500
    check()
    node.refresh_from_db()
    assert (node.health, node.consecutive_failures) == ("healthy", 1)
    check()
    node.refresh_from_db()
    assert node.health == "unhealthy"
    stub.health_status = 200
    check()
    node.refresh_from_db()
    assert (node.health, node.consecutive_successes) == ("unhealthy", 1)
    check()
    node.refresh_from_db()
    assert node.health == "healthy"
    assert Node.objects.filter(pk=node.pk).exists()  # marked, never deleted


def test_an_unreachable_node_is_marked_unhealthy(system, redis_url) -> None:
    node = services.node_create(actor=system, url=f"http://127.0.0.1:{free_port()}", models=["m"])
    check()
    report = check()
    node.refresh_from_db()
    assert node.health == "unhealthy"
    assert report.transitions and "ConnectError" in report.transitions[0]


def test_only_transitions_are_audited_and_bump_the_version(engine_stub, system, redis_url) -> None:
    url, stub = engine_stub
    node = services.node_create(actor=system, url=url, models=["m"], health="healthy")
    version = services.config_version_current()
    records = ChangeRecord.objects.count()
    check()  # healthy stays healthy: bookkeeping only
    assert services.config_version_current() == version
    assert ChangeRecord.objects.count() == records
    stub.health_status = 503
    check()
    check()
    assert services.config_version_current() == version + 1
    record = ChangeRecord.objects.latest("id")
    assert (record.actor_label, record.changes) == ("health-check", {"health": ["healthy", "unhealthy"]})
    node.refresh_from_db()
    assert node.operator_fields == []


def test_disabled_and_gone_nodes_are_not_probed(engine_stub, system, redis_url) -> None:
    url, stub = engine_stub
    services.node_create(actor=system, url=url, models=["m"], state="disabled")
    services.node_create(actor=system, url=url + "/gone", models=["m"], state="gone")
    assert check().checked == 0
    assert stub.calls == []


def test_probe_results_are_kept_as_bounded_history(engine_stub, system, redis_url, settings) -> None:
    settings.ROUTERPANEL_HEALTH_HISTORY = 3
    url, stub = engine_stub
    node = services.node_create(actor=system, url=url, models=["m"])
    for status in (200, 500, 200, 503):
        stub.health_status = status
        check()
    history = health.recent_history(node.pk)
    assert [h["detail"] for h in history] == ["HTTP 503", "OK", "HTTP 500"]


def test_a_second_runner_skips_while_the_lock_is_held(engine_stub, system, redis_url) -> None:
    url, stub = engine_stub
    services.node_create(actor=system, url=url, models=["m"])
    lock = health.health_lock()
    assert lock.acquire()
    try:
        report = check()
    finally:
        lock.release()
    assert report.skipped and stub.calls == []


def test_probe_now_through_the_api(engine_stub, operator_api, system, redis_url) -> None:
    url, _ = engine_stub
    node = services.node_create(actor=system, url=url, models=["m"], state="disabled")
    response = operator_api.post(f"/api/nodes/{node.pk}/probe/")
    assert response.status_code == 200
    assert response.json()["health"] == "healthy"  # "probe now" also probes a disabled node


def test_the_admin_probe_action_and_history(engine_stub, client, admin_user, system, redis_url) -> None:
    url, _ = engine_stub
    node = services.node_create(actor=system, url=url, models=["m"])
    client.force_login(admin_user)
    response = client.post("/admin/nodes/node/", {"action": "probe_nodes", "_selected_action": [node.pk]}, follow=True)
    assert "healthy" in response.content.decode()
    page = client.get(f"/admin/nodes/node/{node.pk}/change/").content.decode()
    assert "recent probes" in page.lower() and "<td>OK</td>" in page


def test_beat_schedules_the_health_check_with_expiry_under_the_interval(settings) -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["health-check"]
    assert entry["task"] == "nodes.check_health"
    assert entry["options"]["expires"] < entry["schedule"]


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
