"""API keys' token budgets in the registry: what the REST API and the admin accept, and the key's
admin page showing the tokens the web workers counted against them."""

from __future__ import annotations

import time

import redis
from django.test import Client
from rest_framework.test import APIClient

from nodes.live import budgets as live
from nodes.live import keys
from nodes.models import ApiKey


def test_budgets_are_set_and_cleared_through_the_api(operator_api: APIClient) -> None:
    body = {"name": "app", "tokens_per_minute": 1000, "tokens_per_day": 50000}
    created = operator_api.post("/api/api-keys/", body, format="json").json()
    assert (created["tokens_per_minute"], created["tokens_per_day"]) == (1000, 50000)
    cleared = operator_api.patch(f"/api/api-keys/{created['id']}/", {"tokens_per_day": None}, format="json")
    assert cleared.status_code == 200
    key = ApiKey.objects.get(pk=created["id"])
    assert (key.tokens_per_minute, key.tokens_per_day) == (1000, None)


def test_a_budget_of_zero_or_less_is_refused_with_the_way_out(operator_api: APIClient) -> None:
    for value in (0, -5):
        response = operator_api.post("/api/api-keys/", {"name": "z", "tokens_per_minute": value}, format="json")
        assert response.status_code == 400, value
        assert "tokens_per_minute" in response.json()
    assert not ApiKey.objects.exists()


def test_the_keys_admin_page_shows_its_use_against_its_budgets(client: Client, admin_user, redis_url: str) -> None:
    client.force_login(admin_user)
    response = client.post(
        "/admin/nodes/apikey/add/",
        {"name": "app", "allowed_models": "[]", "tokens_per_minute": "1000", "tokens_per_day": "", "is_active": "on"},
    )
    assert response.status_code == 302
    key = ApiKey.objects.get()
    assert key.tokens_per_minute == 1000
    now = time.time()
    shared = redis.Redis.from_url(redis_url)
    shared.hset(keys.tokens_minute_key(live.minute_of(now)), str(key.pk), 250)
    shared.hset(keys.tokens_day_key(live.day_of(now)), str(key.pk), 4000)
    html = client.get(f"/admin/nodes/apikey/{key.pk}/change/").content.decode()
    assert "250 of 1,000 tokens (25%) this minute" in html
    assert "4,000 tokens (no budget) today" in html
