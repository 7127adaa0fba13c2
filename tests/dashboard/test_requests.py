"""The Requests page: who may see it, what it carries, its filters, and its live tail."""

from __future__ import annotations

import json

import pytest
from channels.testing import WebsocketCommunicator
from django.test import Client

from dashboard.consumers import FORBIDDEN, RequestsConsumer
from nodes import services
from tests.nodes.explain_records import explanation, flush_all, store

from .test_dashboard import channel_layer

__all__ = ["channel_layer"]

pytestmark = pytest.mark.django_db


def initial(response) -> dict:
    html = response.content.decode()
    start = html.index('<script id="rp-initial" type="application/json">') + len(
        '<script id="rp-initial" type="application/json">'
    )
    return json.loads(html[start : html.index("</script>", start)])


def test_it_is_for_staff_only(client: Client, outsider_user) -> None:
    response = client.get("/dashboard/requests/")
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    client.force_login(outsider_user)
    assert client.get("/dashboard/requests/").status_code == 302


def test_the_page_carries_the_newest_records_and_links_to_older_ones(client: Client, operator_user, redis_url) -> None:
    store(redis_url, [explanation(f"r{i}") for i in range(60)])
    client.force_login(operator_user)
    response = client.get("/dashboard/requests/")
    assert response.status_code == 200
    records = initial(response)["records"]
    assert [r["id"] for r in records[:2]] == ["r59", "r58"] and len(records) == 50
    older = response.context["page"]["older"]
    assert older.startswith("/dashboard/requests/?cursor=")
    assert [r["id"] for r in initial(client.get(older))["records"]] == [f"r{i}" for i in range(9, -1, -1)]
    assert response.context["config"]["tail"] is True
    assert b'src="/static/dashboard/requests.js"' in response.content


def test_filters_and_one_selected_request(client: Client, operator_user, redis_url, system) -> None:
    node = services.node_create(actor=system, url="http://n2:8000", models=["x"], name="second")
    store(redis_url, [explanation("a", model="x", status=503), explanation("b", model="y"), explanation("c")])
    client.force_login(operator_user)
    response = client.get("/dashboard/requests/", {"model": "x", "status": "5xx", "request": "b"})
    assert [r["id"] for r in initial(response)["records"]] == ["a"]
    assert initial(response)["selected"]["id"] == "b"
    assert response.context["config"]["tail_filters"] == {"model": "x", "status": "5xx"}
    assert response.context["config"]["nodes"][str(node.pk)] == "second (http://n2:8000)"
    assert "x" in response.context["options"]["models"]
    missing = client.get("/dashboard/requests/", {"request": "gone"})
    assert b"No explanation of request gone is kept" in missing.content


def test_bad_filters_are_shown_not_a_500(client: Client, operator_user, redis_url) -> None:
    client.force_login(operator_user)
    response = client.get("/dashboard/requests/", {"status": "teapot", "since": "whenever"})
    assert response.status_code == 200
    assert set(response.context["page"]["errors"]) == {"status", "since"}
    assert b'id="rp-filter-errors"' in response.content


def test_a_fixed_time_range_or_an_older_page_is_not_followed_live(client: Client, operator_user, redis_url) -> None:
    client.force_login(operator_user)
    assert client.get("/dashboard/requests/", {"until": "2030-01-01T00:00"}).context["config"]["tail"] is False
    assert client.get("/dashboard/requests/", {"window": "5m"}).context["config"]["tail"] is True


def test_without_redis_the_page_says_so(client: Client, operator_user) -> None:
    client.force_login(operator_user)
    response = client.get("/dashboard/requests/")
    assert response.status_code == 200
    assert b"Explanations cannot be read (Redis unreachable)" in response.content


def test_the_admin_and_the_dashboard_link_to_it(client: Client, admin_user) -> None:
    client.force_login(admin_user)
    index = client.get("/admin/").content.decode()
    assert index.count('href="/dashboard/requests/"') == 2  # the header and the index's live views
    assert 'href="/dashboard/requests/"' in client.get("/dashboard/").content.decode()


@pytest.mark.django_db(transaction=True)
async def test_the_live_tail_sends_what_arrives_after_the_page_and_matches(operator_user, channel_layer) -> None:
    import redis.asyncio as aioredis
    from django.conf import settings

    from nodes.live import explain_store
    from proxy.explain import Explainer

    communicator = WebsocketCommunicator(RequestsConsumer.as_asgi(), "/ws/requests/")
    communicator.scope["user"] = operator_user
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    try:
        redis_url = settings.ROUTERPANEL_REDIS_URL
        await flush_all(redis_url, Explainer(), [explanation("before")])
        client = aioredis.Redis.from_url(redis_url)
        after = await explain_store.newest_entry(client)
        await client.aclose()
        await communicator.send_json_to({"type": "follow", "after": after, "filters": {"model": "x"}})
        assert await communicator.receive_json_from(timeout=10) == {"type": "status", "live": True}
        await flush_all(redis_url, Explainer(), [explanation("new", model="x"), explanation("other", model="y")])
        message = await communicator.receive_json_from(timeout=10)
        assert message["type"] == "records" and [r["id"] for r in message["records"]] == ["new"]
        await communicator.send_json_to({"type": "follow", "after": "nonsense", "filters": {}})
        assert (await communicator.receive_json_from(timeout=10))["type"] == "error"
    finally:
        await communicator.disconnect()


async def test_the_live_tail_turns_away_users_who_are_not_staff(outsider_user, channel_layer) -> None:
    communicator = WebsocketCommunicator(RequestsConsumer.as_asgi(), "/ws/requests/")
    communicator.scope["user"] = outsider_user
    connected, code = await communicator.connect(timeout=10)
    assert not connected and code == FORBIDDEN
    await communicator.disconnect()


async def test_the_live_tail_ends_quietly_once_its_client_is_gone(redis_url, monkeypatch) -> None:
    """The browser left: the first send fails and the tail stops there, without an error of its
    own (a task failing with nobody to collect it is logged when it is garbage-collected)."""
    import asyncio

    import redis.asyncio as aioredis
    from uvicorn.protocols.utils import ClientDisconnected

    from nodes.live.explain_store import RequestFilter

    consumer = RequestsConsumer()
    consumer._redis = aioredis.Redis.from_url(redis_url)
    sent: list[dict] = []

    async def send_json(content: dict, close: bool = False) -> None:
        sent.append(content)
        raise ClientDisconnected()

    monkeypatch.setattr(consumer, "send_json", send_json)
    monkeypatch.setattr(consumer, "interval", 0.01)
    try:
        await asyncio.wait_for(consumer._tail("0", RequestFilter()), timeout=10)
    finally:
        await consumer._redis.aclose()
    assert sent == [{"type": "status", "live": True}]
