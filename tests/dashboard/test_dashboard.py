"""The operator dashboard: who may see it, what its data says, and its WebSocket feed."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis
from channels.testing import WebsocketCommunicator
from django.test import Client

from dashboard.consumers import FORBIDDEN, DashboardConsumer, notify_dashboards
from dashboard.payload import build_payload, payload_update
from nodes import services
from nodes.live import usage as live_usage
from nodes.live.breakers import parse_breakers
from nodes.live.keys import BREAKERS as BREAKERS_KEY
from nodes.models import ControlPlane, RoutePolicy
from nodes.rules import is_routable
from nodes.selectors import fleet_state, model_readiness
from proxy.shared import SharedCounters
from proxy.stats import NodeStats
from tests.support.layers import channel_layers_at

pytestmark = pytest.mark.django_db


@pytest.fixture
def channel_layer(redis_url, settings):
    """The channels-redis layer on the test Redis (the consumer joins a group on connect)."""
    from channels.layers import channel_layers

    settings.CHANNEL_LAYERS = channel_layers_at(settings.CHANNEL_LAYERS, redis_url)
    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


@pytest.fixture
def fleet(system):
    """Two models: ``qwen`` served by a prefill/decode pair, ``llama`` by one hybrid node."""
    return {
        "prefill": services.node_create(actor=system, url="http://p:1", role="prefill", models=["qwen"]),
        "decode": services.node_create(actor=system, url="http://d:1", role="decode", models=["qwen"]),
        "hybrid": services.node_create(actor=system, url="http://h:1", models=["llama"], name="big box"),
    }


def _row(role: str, state: str = "active", health: str = "healthy", node_id: int = 0) -> dict:
    return {"id": node_id, "role": role, "state": state, "health": health, "routable": is_routable(state, health)}


@pytest.mark.parametrize(
    ("mode", "nodes", "ready", "effective", "reasons"),
    [
        ("auto", [_row("hybrid")], True, "hybrid", []),
        ("auto", [_row("hybrid", health="unknown")], False, "hybrid", ["no healthy hybrid node"]),
        ("auto", [_row("prefill"), _row("decode")], True, "pd", []),
        ("auto", [_row("prefill", health="unknown"), _row("decode")], False, "pd", ["no healthy prefill node"]),
        # auto with a routable hybrid node but a sick prefill: served hybrid.
        ("auto", [_row("prefill", health="unhealthy"), _row("decode"), _row("hybrid")], True, "hybrid", []),
        # auto without any routable hybrid node: PD, so the reasons name the missing role.
        ("auto", [_row("prefill", health="unhealthy"), _row("decode")], False, "pd", ["no healthy prefill node"]),
        ("pd", [_row("prefill"), _row("decode", state="draining")], False, "pd", ["no healthy decode node"]),
        ("pd", [_row("hybrid")], False, "pd", ["no healthy prefill node", "no healthy decode node"]),
        ("hybrid", [_row("hybrid", state="disabled")], False, "hybrid", ["no healthy hybrid node"]),
        ("hybrid", [_row("prefill"), _row("decode"), _row("hybrid")], True, "hybrid", []),
    ],
)
def test_readiness_follows_the_serving_mode(mode, nodes, ready, effective, reasons) -> None:
    assert model_readiness(mode, nodes)[:3] == (ready, effective, reasons)


@pytest.mark.parametrize(
    ("mode", "nodes", "threshold", "panic"),
    [
        ("auto", [_row("hybrid"), _row("hybrid", health="unhealthy")], 0.5, {}),  # half pass: no panic
        (
            "auto",
            [_row("hybrid"), _row("hybrid", health="unhealthy"), _row("hybrid", health="unhealthy")],
            0.5,
            {"hybrid": 3},
        ),
        ("auto", [_row("hybrid", health="unhealthy")] * 2, 0.0, {}),  # turned off
        ("auto", [_row("hybrid", health="unknown")] * 2, 0.5, {}),  # never probed: never routed to
        # The mode follows the healthy nodes: a sick prefill does not turn the model away from its hybrid node.
        ("auto", [_row("prefill", health="unhealthy"), _row("decode"), _row("hybrid")], 0.5, {}),
        ("auto", [_row("prefill", health="unhealthy"), _row("decode")], 0.5, {"prefill": 1}),
    ],
)
def test_below_the_panic_threshold_a_role_routes_to_all_its_probed_nodes(mode, nodes, threshold, panic) -> None:
    assert model_readiness(mode, nodes, panic_threshold=threshold)[3] == panic


def test_an_open_breaker_makes_a_healthy_node_count_as_sick() -> None:
    nodes = [_row("hybrid", node_id=1), _row("hybrid", node_id=2)]
    assert model_readiness("hybrid", nodes, {1: "open", 2: "half_open"})[0] is True
    assert model_readiness("hybrid", nodes, {1: "open", 2: "open"})[:3] == (False, "hybrid", ["no healthy hybrid node"])


def test_anonymous_visitors_are_sent_to_the_admin_login(client: Client) -> None:
    for path in ("/dashboard/", "/dashboard/data", "/dashboard/usage"):
        response = client.get(path)
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")


def test_a_user_who_is_not_staff_may_not_see_it(client: Client, outsider_user) -> None:
    client.force_login(outsider_user)
    assert client.get("/dashboard/").status_code == 302
    assert client.get("/dashboard/data").status_code == 302
    assert client.get("/dashboard/usage").status_code == 302


def test_the_page_carries_the_fleet_and_the_chart_library_from_the_project(
    client: Client, operator_user, fleet
) -> None:
    client.force_login(operator_user)
    response = client.get("/dashboard/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "/static/dashboard/vendor/uplot/uPlot.iife.min.js" in html
    assert "cdn" not in html.lower()
    assert '<th scope="col">Health</th>' in html
    assert 'aria-live="polite"' in html
    initial = json.loads(html.split('id="rp-initial" type="application/json">')[1].split("</script>")[0])
    assert {n["url"] for n in initial["nodes"]} == {"http://p:1", "http://d:1", "http://h:1"}
    assert client.get("/static/dashboard/vendor/uplot/uPlot.iife.min.js").status_code == 200
    assert client.get("/static/dashboard/dashboard.js").status_code == 200


def test_the_data_has_nodes_models_and_control_planes(client: Client, operator_user, fleet, system) -> None:
    services.control_plane_create(actor=system, name="ctrl-a", address="127.0.0.1:4479")
    services.node_update(node=fleet["decode"], actor=system, health="unhealthy")
    for name in ("prefill", "hybrid"):
        services.node_update(node=fleet[name], actor=system, health="healthy")
    client.force_login(operator_user)

    data = client.get("/dashboard/data").json()

    assert data["live"] is False  # no Redis in this test: the registry alone
    nodes = {n["url"]: n for n in data["nodes"]}
    assert nodes["http://h:1"]["name"] == "big box"
    assert nodes["http://h:1"]["models"] == ["llama"]
    assert nodes["http://d:1"]["routable"] is False
    assert nodes["http://p:1"]["breaker"] is None
    assert nodes["http://p:1"]["live"] is None
    assert nodes["http://p:1"]["admin_url"] == f"/admin/nodes/node/{fleet['prefill'].id}/change/"
    models = {m["name"]: m for m in data["models"]}
    assert models["llama"]["ready"] is True
    assert models["llama"]["effective_mode"] == "hybrid"
    assert models["qwen"]["ready"] is False
    assert models["qwen"]["reasons"] == ["no healthy decode node"]
    assert sorted(models["qwen"]["nodes"]) == sorted([fleet["prefill"].id, fleet["decode"].id])
    (plane,) = data["control_planes"]
    assert plane["name"] == "ctrl-a"
    assert plane["sync_state"] == "idle"
    assert plane["last_sync_at"] is None


def test_a_models_own_policy_wins_over_the_default(client: Client, operator_user, fleet, system) -> None:
    services.policy_create(actor=system, model="qwen", strategy="power_of_two", serving_mode="hybrid")
    cards = {m["name"]: m for m in fleet_state()["models"]}
    assert cards["qwen"]["strategy"] == "power_of_two"
    assert cards["qwen"]["effective_mode"] == "hybrid"
    assert cards["qwen"]["reasons"] == ["no healthy hybrid node"]
    default = RoutePolicy.objects.get(model="")
    assert cards["llama"]["strategy"] == default.strategy


def test_gone_nodes_are_listed_but_serve_no_model(fleet, system) -> None:
    services.node_update(node=fleet["hybrid"], actor=system, state="gone")
    state = fleet_state()
    assert "http://h:1" in {n["url"] for n in state["nodes"]}
    assert "llama" not in {m["name"] for m in state["models"]}


def test_live_figures_and_breaker_states_join_their_nodes(fleet) -> None:
    payload = build_payload(
        fleet_state(),
        {fleet["hybrid"].id: {"inflight": 2, "rps": 3.0}},  # type: ignore[dict-item]
        {fleet["hybrid"].id: "open"},
    )
    nodes = {n["url"]: n for n in payload["nodes"]}
    assert payload["live"] is True
    assert nodes["http://h:1"]["live"] == {"inflight": 2, "rps": 3.0}
    assert nodes["http://h:1"]["breaker"] == "open"
    assert nodes["http://p:1"]["live"] is None


def test_the_json_includes_what_the_workers_published(client: Client, operator_user, fleet, redis_url) -> None:
    import asyncio

    node_stats = NodeStats()
    for _ in range(3):
        node_stats.record(fleet["hybrid"].id, status=200, elapsed=0.1)
    worker = SharedCounters(redis_url, stats=node_stats, inflight=lambda: {fleet["hybrid"].id: 1}, worker="w")
    asyncio.run(worker.publish_stats())
    client.force_login(operator_user)

    data = client.get("/dashboard/data").json()

    assert data["live"] is True
    live = {n["url"]: n["live"] for n in data["nodes"]}["http://h:1"]
    assert live["requests"] == 3
    assert live["inflight"] == 1
    assert live["p50_latency"] == pytest.approx(0.1)


@pytest.mark.django_db(transaction=True)
async def test_the_websocket_pushes_the_payload_then_what_changed_every_second_to_staff(
    operator_user, system, channel_layer
) -> None:
    from asgiref.sync import sync_to_async

    await sync_to_async(services.node_create)(actor=system, url="http://h:2", models=["m"])
    other = await sync_to_async(services.node_create)(actor=system, url="http://h:3", models=["m"])
    communicator = WebsocketCommunicator(DashboardConsumer.as_asgi(), "/ws/dashboard/")
    communicator.scope["user"] = operator_user
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    try:
        first = await communicator.receive_json_from(timeout=10)
        assert first["type"] == "full"
        assert [n["url"] for n in first["nodes"]] == ["http://h:2", "http://h:3"]
        assert first["models"][0]["name"] == "m"
        second = await communicator.receive_json_from(timeout=10)  # the next tick, unasked
        assert second["generated_at"] > first["generated_at"]
        assert (second["type"], second["nodes"]) == ("update", [])  # nothing changed: nothing resent
        assert "models" not in second and "order" not in second
        await sync_to_async(services.node_drain)(node=other, actor=system)
        await communicator.send_json_to({"type": "refresh"})
        drained = await communicator.receive_json_from(timeout=10)
        assert [(n["url"], n["state"]) for n in drained["nodes"]] == [("http://h:3", "draining")]
        await notify_dashboards()
        assert (await communicator.receive_json_from(timeout=10))["type"] == "update"
    finally:
        await communicator.disconnect()


def test_an_update_carries_a_nodes_history_as_its_new_seconds() -> None:
    node = {"id": 1, "url": "http://h:1", "state": "active", "health": "healthy", "breaker": "closed"}
    figures = {"inflight": 0, "requests": 5, "errors": 0, "rps": 1.0, "error_rate": 0.0}
    before = {"generated_at": "a", "live": True, "models": [], "control_planes": []}
    after = dict(before, generated_at="b")
    before["nodes"] = [{**node, "live": {**figures, "history": [0, 1, 2, 3]}}]
    after["nodes"] = [{**node, "live": {**figures, "requests": 7, "history": [2, 3, 4, 5]}}]
    update = payload_update(before, after)  # type: ignore[arg-type]
    [changed] = update["nodes"]
    assert changed["live"]["history_shift"] == 2 and changed["live"]["history_new"] == [4, 5]
    assert "history" not in changed["live"] and changed["live"]["requests"] == 7
    reshaped = dict(after, nodes=[{**node, "live": {**figures, "history": [9, 9, 9, 9, 9]}}])
    assert payload_update(before, reshaped)["nodes"][0]["live"]["history"] == [9, 9, 9, 9, 9]  # type: ignore[arg-type]
    assert payload_update(None, after)["type"] == "full"  # type: ignore[arg-type]
    card = {"name": "m", "ready": True, "nodes": [1]}
    with_cards = dict(after, models=[card, {"name": "n", "ready": True, "nodes": [2]}])
    one_changed = dict(with_cards, models=[card, {"name": "n", "ready": False, "nodes": [2]}])
    update = payload_update(with_cards, one_changed)  # type: ignore[arg-type]
    assert update["models"] == [{"name": "n", "ready": False, "nodes": [2]}] and "model_order" not in update


async def test_the_websocket_turns_away_users_who_are_not_staff(outsider_user, channel_layer) -> None:
    communicator = WebsocketCommunicator(DashboardConsumer.as_asgi(), "/ws/dashboard/")
    communicator.scope["user"] = outsider_user
    connected, code = await communicator.connect(timeout=10)
    assert not connected
    assert code == FORBIDDEN
    await communicator.disconnect()


def test_control_planes_count_their_live_nodes(system) -> None:
    plane = services.control_plane_create(actor=system, name="cp", address="127.0.0.1:1")
    services.node_create(actor=system, url="http://r:1", control_plane=plane, source="registry", entity_id="e1")
    services.node_create(
        actor=system, url="http://r:2", control_plane=plane, source="registry", entity_id="e2", state="gone"
    )
    assert [(row["name"], row["nodes"]) for row in fleet_state()["control_planes"]] == [("cp", 1)]
    assert ControlPlane.objects.count() == 1


def test_breaker_states_come_from_the_proxys_shared_hash() -> None:
    raw = {
        b"1": json.dumps({"state": "open", "until": 2000.0, "at": 1000.0}),
        b"2": json.dumps({"state": "open", "until": 1500.0, "at": 1000.0}),  # cool-down over
        b"3": json.dumps({"state": "closed", "until": 0, "at": 1000.0}),
        b"4": b"not json",
        b"x": json.dumps({"state": "open"}),
    }
    assert parse_breakers(raw, now=1600.0) == {1: "open", 2: "half_open", 3: "closed"}


def test_the_json_shows_breakers_closed_unless_the_proxy_opened_them(
    client: Client, operator_user, fleet, redis_url
) -> None:
    import redis

    opened = json.dumps({"state": "open", "until": 4_000_000_000.0, "at": 1.0})
    redis.Redis.from_url(redis_url).hset(BREAKERS_KEY, str(fleet["decode"].id), opened)
    client.force_login(operator_user)

    nodes = {n["url"]: n for n in client.get("/dashboard/data").json()["nodes"]}

    assert nodes["http://d:1"]["breaker"] == "open"
    assert nodes["http://p:1"]["breaker"] == "closed"


def test_the_page_gets_the_breaker_labels_and_colours_from_their_one_definition() -> None:
    from dashboard.payload import page_config
    from nodes.choices import BreakerState

    breaker = page_config(data_path="/dashboard/data")["choices"]["breaker"]
    assert breaker == {
        state: {"label": str(label), "colour": BreakerState.colour(state)} for state, label in BreakerState.choices
    }


def test_the_usage_chart_has_the_last_hours_tokens_per_model(client: Client, operator_user, redis_url) -> None:
    now = time.time()
    minute = int(now // 60)
    client_redis = redis.Redis.from_url(redis_url)
    with client_redis.pipeline(transaction=False) as pipe:
        live_usage.queue_add(pipe, {(minute, 1, "m", "http://a:1"): [3, 4, 1, 0, 0, 0]})
        live_usage.queue_add(pipe, {(minute - 2, 2, "m", "http://b:1"): [10, 0, 1, 0, 0, 0]})
        live_usage.queue_add(pipe, {(minute - 90, 2, "old", "http://b:1"): [10, 0, 1, 0, 0, 0]})
        pipe.execute()
    client.force_login(operator_user)
    page = client.get("/dashboard/").content.decode()
    assert 'id="rp-usage-chart"' in page and "/static/dashboard/usage.js" in page
    assert client.get("/static/dashboard/usage.js").status_code == 200
    chart = client.get("/dashboard/usage").json()
    assert chart["unavailable"] is False
    assert [s["model"] for s in chart["series"]] == ["m"]  # "old" is more than an hour ago
    tokens = chart["series"][0]["tokens"]
    assert len(tokens) == 60 and tokens[-1] == 7 and tokens[-3] == 10


def test_the_channel_layers_reads_outlast_its_blocking_receive(settings) -> None:
    """A WebSocket consumer waits for group messages with a blocking pop that Redis ends every
    ``brpop_timeout`` seconds. A connection read timeout no longer than that (redis-py 8's default
    is the same 5 s) races it, and each lost race closed the WebSocket of a dashboard that was only
    watching: the page reconnected and was sent the whole fleet again."""
    from channels_redis.core import RedisChannelLayer
    from channels_redis.utils import create_pool, decode_hosts

    (host,) = decode_hosts(settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"])
    pool = create_pool(host)
    read_timeout = pool.connection_class(**pool.connection_kwargs).socket_timeout
    assert read_timeout is None or read_timeout >= 2 * RedisChannelLayer.brpop_timeout


async def test_a_dashboards_updates_stop_once_its_client_is_gone(monkeypatch) -> None:
    """When the browser has gone, sending fails: the consumer's loop ends there instead of building
    and failing to send an update every second for as long as the worker runs (which it did when the
    consumer ended without its disconnect handler, on an error of the channel layer)."""
    from uvicorn.protocols.utils import ClientDisconnected

    consumer = DashboardConsumer()
    consumer._wake = asyncio.Event()
    built: list[int] = []

    async def payload() -> dict:
        built.append(len(built))
        return {"generated_at": str(len(built)), "live": True, "nodes": [], "models": [], "control_planes": []}

    async def send_json(content: dict, close: bool = False) -> None:
        raise ClientDisconnected()

    monkeypatch.setattr(consumer, "payload", payload)
    monkeypatch.setattr(consumer, "send_json", send_json)
    monkeypatch.setattr(consumer, "interval", 0.01)
    await asyncio.wait_for(consumer._push_loop(), timeout=10)
    assert built == [0]
