"""``/api/requests/``: the request explanations through the REST API, on the test Redis."""

from __future__ import annotations

import datetime

import pytest
from rest_framework.test import APIClient

from .explain_records import explanation, store

pytestmark = pytest.mark.django_db


def test_reading_needs_a_login_and_any_logged_in_user_may(anonymous_api: APIClient, outsider_api: APIClient, redis_url):
    store(redis_url, [explanation("r1")])
    assert anonymous_api.get("/api/requests/").status_code == 401
    assert anonymous_api.get("/api/requests/r1/").status_code == 401
    assert outsider_api.get("/api/requests/").status_code == 200
    assert outsider_api.post("/api/requests/", {}, format="json").status_code in (403, 405)


def test_nobody_writes_explanations_through_the_api(admin_api: APIClient, redis_url):
    assert admin_api.post("/api/requests/", {}, format="json").status_code == 405
    assert admin_api.delete("/api/requests/r1/").status_code == 405


def test_the_list_is_newest_first_filtered_and_paged_by_cursor(admin_api: APIClient, redis_url):
    store(redis_url, [explanation(f"r{i}", model="x" if i % 2 else "y", node=1 + i % 3) for i in range(7)])
    page = admin_api.get("/api/requests/", {"limit": 3}).json()
    assert [r["id"] for r in page["results"]] == ["r6", "r5", "r4"]
    following = admin_api.get(page["next"]).json()
    assert [r["id"] for r in following["results"]] == ["r3", "r2", "r1"]
    last = admin_api.get(following["next"]).json()
    assert [r["id"] for r in last["results"]] == ["r0"] and last["next"] is None
    assert [r["id"] for r in admin_api.get("/api/requests/", {"model": "x"}).json()["results"]] == ["r5", "r3", "r1"]
    assert [r["id"] for r in admin_api.get("/api/requests/", {"node": 2}).json()["results"]] == ["r4", "r1"]
    assert admin_api.get("/api/requests/", {"status": "5xx"}).json()["results"] == []
    future = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).isoformat()
    assert admin_api.get("/api/requests/", {"since": future}).json()["results"] == []
    assert len(admin_api.get("/api/requests/", {"until": future}).json()["results"]) == 7


def test_one_request_reads_in_full(admin_api: APIClient, redis_url):
    store(redis_url, [explanation("abc-123", node=2, status=503, key="team-a")])
    record = admin_api.get("/api/requests/abc-123/").json()
    assert (record["id"], record["key"], record["model"], record["status"]) == ("abc-123", "team-a", "m", 503)
    [choice] = record["choices"]
    assert choice["pick"] == {"node": 2, "url": "http://n2:8000"} and choice["role"] == "hybrid"
    assert [c["url"] for c in choice["candidates"]][:1] == ["http://n2:8000"]
    assert record["at"].endswith("Z") or record["at"].endswith("+00:00")
    assert admin_api.get("/api/requests/nope/").status_code == 404


@pytest.mark.parametrize(
    "query",
    [{"status": "teapot"}, {"limit": 0}, {"limit": 501}, {"node": "x"}, {"since": "yesterday"}, {"cursor": "x"}],
)
def test_bad_filters_are_a_400_naming_the_field(admin_api: APIClient, redis_url, query: dict):
    response = admin_api.get("/api/requests/", query)
    assert response.status_code == 400
    assert set(response.json()) == set(query)


def test_a_redis_that_cannot_be_read_is_a_503(admin_api: APIClient):
    response = admin_api.get("/api/requests/")  # the tests aim Redis at a closed port unless asked
    assert response.status_code == 503
    assert "Redis" in response.json()["detail"]
    assert admin_api.get("/api/requests/x/").status_code == 503


def test_a_stored_record_answers_as_the_openapi_schema_says(admin_user, redis_url):
    """schemathesis (test_api_schema.py) meets an empty store; here full records, with every kind
    of value, are checked against the published schema the same way."""
    import schemathesis
    from django.core import signals
    from django.core.wsgi import get_wsgi_application
    from django.db import close_old_connections
    from drf_spectacular.generators import SchemaGenerator
    from rest_framework.authtoken.models import Token
    from werkzeug.test import Client

    item = explanation("full", status=502)
    item.error, item.message = "engine_unreachable", "Node http://n1:8000 could not be reached"
    store(redis_url, [item, explanation("other", node=3)])
    schema = schemathesis.openapi.from_dict(SchemaGenerator().get_schema(request=None, public=True))
    headers = {"Authorization": f"Bearer {Token.objects.create(user=admin_user).key}"}
    # Django's request signals would close the test's database connection (see test_api_schema.py).
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        client = Client(get_wsgi_application())
        for path, operation in (
            ("/api/requests/?limit=1", "/api/requests/"),
            ("/api/requests/full/", "/api/requests/{id}/"),
        ):
            response = client.get(path, headers=headers)
            assert response.status_code == 200, response.get_data()
            schema[operation]["GET"].validate_response(response)
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)
