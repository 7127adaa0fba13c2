"""Usage per key, model and node: the web workers' minutes rolled up into hourly rows (idempotent),
read back through ``/api/usage/``, downloaded as CSV from the admin, and charted per model."""

from __future__ import annotations

import csv
import datetime
import io

import pytest
import redis
from django.test import Client
from rest_framework.test import APIClient

from nodes import selectors, services
from nodes.live import usage as live
from nodes.models import ApiKey, UsageHour

HOUR = 3600
NOW = 490_000 * HOUR + 25 * 60 + 10.0  # 25 minutes into an hour
MINUTE = int(NOW // 60)
PREVIOUS_HOUR_MINUTE = (int(NOW // HOUR) - 1) * 60 + 59


def add(redis_url: str, counts: dict[tuple[int, int, str, str], list[int]]) -> None:
    client = redis.Redis.from_url(redis_url)
    with client.pipeline(transaction=False) as pipe:
        live.queue_add(pipe, counts)
        pipe.execute()


@pytest.fixture
def key(system) -> ApiKey:
    return services.api_key_create(actor=system, name="team-a")[0]


@pytest.fixture
def used(redis_url: str, key: ApiKey) -> None:
    """Two workers' minutes: team-a on model m over two nodes, in this hour and the one before, and a
    request without a key."""
    add(redis_url, {(MINUTE, key.pk, "m", "http://a:1"): [10, 20, 2, 0, 300, 2]})
    add(redis_url, {(MINUTE - 1, key.pk, "m", "http://a:1"): [5, 5, 1, 1, 0, 0]})
    add(redis_url, {(MINUTE, key.pk, "m", "http://b:1"): [1, 2, 1, 0, 100, 1]})
    add(redis_url, {(PREVIOUS_HOUR_MINUTE, key.pk, "m", "http://a:1"): [7, 0, 1, 0, 0, 0]})
    add(redis_url, {(MINUTE, 0, "other", "-"): [0, 0, 1, 1, 0, 0]})


@pytest.mark.django_db
def test_the_rollup_sums_an_hours_minutes_into_one_row_per_key_model_and_node(used, key: ApiKey) -> None:
    assert services.usage_rollup(now=NOW) == 4
    row = UsageHour.objects.get(key_id=key.pk, node="http://a:1", hour__minute=0, hour__hour=(NOW // HOUR) % 24)
    assert (row.prompt_tokens, row.completion_tokens, row.requests, row.errors) == (15, 25, 3, 1)
    assert (row.mean_ttft_ms, row.key_name) == (150.0, "team-a")
    earlier = UsageHour.objects.get(key_id=key.pk, node="http://a:1", hour__lt=row.hour)
    assert (earlier.prompt_tokens, earlier.requests) == (7, 1)
    assert UsageHour.objects.get(key_id=0).errors == 1


@pytest.mark.django_db
def test_running_the_rollup_again_rewrites_the_same_rows(used, redis_url: str, key: ApiKey) -> None:
    services.usage_rollup(now=NOW)
    first = sorted(UsageHour.objects.values_list("hour", "key_id", "model", "node", "prompt_tokens", "requests"))
    services.usage_rollup(now=NOW)
    assert (
        sorted(UsageHour.objects.values_list("hour", "key_id", "model", "node", "prompt_tokens", "requests")) == first
    )
    add(redis_url, {(MINUTE, key.pk, "m", "http://b:1"): [4, 0, 1, 0, 0, 0]})  # more came in the same hour
    services.usage_rollup(now=NOW)
    assert UsageHour.objects.count() == 4
    assert UsageHour.objects.get(node="http://b:1").prompt_tokens == 5


@pytest.mark.django_db
def test_rows_older_than_the_retention_are_pruned_and_the_others_kept(key: ApiKey, settings) -> None:
    settings.ROUTERPANEL_USAGE_RETENTION_DAYS = 30
    hour = datetime.datetime.fromtimestamp(int(NOW // HOUR) * HOUR, tz=datetime.UTC)
    # NOW is 25 minutes into its hour: the hour that began 30 days before this one is past the window.
    ages = {"kept": datetime.timedelta(days=29, hours=23), "pruned": datetime.timedelta(days=30)}
    for model, age in ages.items():
        UsageHour.objects.create(hour=hour - age, key_id=key.pk, key_name="team-a", model=model, node="-", requests=1)
    assert services.usage_prune(now=NOW) == 1
    assert list(UsageHour.objects.values_list("model", flat=True)) == ["kept"]
    assert services.usage_prune(now=NOW) == 0


@pytest.mark.django_db
def test_the_api_sums_and_filters_the_hourly_rows(used, operator_api: APIClient) -> None:
    services.usage_rollup(now=NOW)
    by_model = operator_api.get("/api/usage/", {"group_by": "model"}).json()["results"]
    assert by_model == [
        {"model": "m", **_sums(23, 27, 5, 1, 133.3)},
        {"model": "other", **_sums(0, 0, 1, 1, None)},
    ]
    by_node = operator_api.get("/api/usage/", {"group_by": "node", "key": "team-a", "model": "m"}).json()
    assert [(r["node"], r["total_tokens"]) for r in by_node["results"]] == [("http://a:1", 47), ("http://b:1", 3)]
    this_hour = _iso(NOW // HOUR * HOUR)
    hour = operator_api.get("/api/usage/", {"since": this_hour, "group_by": "hour"}).json()
    assert [r["requests"] for r in hour["results"]] == [5]  # the hour before is left out
    refused = operator_api.get("/api/usage/", {"group_by": "model,colour"})
    assert refused.status_code == 400 and "colour" in refused.json()["group_by"][0]


@pytest.mark.django_db
def test_the_api_needs_a_login(anonymous_api: APIClient) -> None:
    assert anonymous_api.get("/api/usage/").status_code in (401, 403)


@pytest.mark.django_db
def test_the_admin_downloads_the_selected_rows_as_csv(used, client: Client, admin_user) -> None:
    services.usage_rollup(now=NOW)
    client.force_login(admin_user)
    assert client.get("/admin/nodes/usagehour/").status_code == 200
    ids = [str(pk) for pk in UsageHour.objects.values_list("pk", flat=True)]
    response = client.post("/admin/nodes/usagehour/", {"action": "download_csv", "_selected_action": ids})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert len(rows) == 4
    a = next(r for r in rows if r["node"] == "http://a:1" and r["prompt_tokens"] == "15")
    assert (a["key_name"], a["total_tokens"], a["requests"], a["mean_ttft_ms"]) == ("team-a", "40", "3", "150.0")


def test_the_chart_has_tokens_per_minute_per_model_for_the_last_hour() -> None:
    counts = live.Counts(prompt_tokens=3, completion_tokens=4)
    minutes = {MINUTE: {(1, "m", "x"): counts, (2, "m", "y"): counts}, MINUTE - 59: {(1, "n", "x"): counts}}
    minutes[MINUTE - 60] = {(1, "m", "x"): counts}  # an hour ago: outside
    chart = selectors.usage_chart(minutes, NOW)
    assert chart["start_minute"] == MINUTE - 59
    series = {s["model"]: s["tokens"] for s in chart["series"]}
    assert series["m"][-1] == 14 and sum(series["m"]) == 14
    assert series["n"][0] == 7 and len(series["n"]) == 60


def _sums(prompt: int, completion: int, requests: int, errors: int, ttft: float | None) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "requests": requests,
        "errors": errors,
        "total_tokens": prompt + completion,
        "mean_ttft_ms": ttft,
    }


def _iso(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, tz=datetime.UTC).isoformat()
