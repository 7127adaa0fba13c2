"""The dashboard's pages (staff only): ``/dashboard/``, the same data as JSON at ``/dashboard/data``,
the last hour's tokens per model at ``/dashboard/usage``, and the request explanations at
``/dashboard/requests/``."""

from __future__ import annotations

import time

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse

from nodes.live import usage as live_usage
from nodes.live.connection import client as redis_client
from nodes.selectors import request_filter_options, usage_chart

from . import requests as requests_page
from .payload import current_payload, page_config


@staff_member_required
def dashboard(request: HttpRequest) -> HttpResponse:
    context = {
        **admin.site.each_context(request),
        "title": "Fleet dashboard",
        "initial": current_payload(),
        "config": {**page_config(data_path=reverse("dashboard-data")), "usage_path": reverse("dashboard-usage")},
    }
    return render(request, "dashboard/index.html", context)


@staff_member_required
def dashboard_usage(request: HttpRequest) -> JsonResponse:
    """Tokens per minute per model over the last hour, from the web workers' live minutes
    (docs/usage.md); ``unavailable`` when Redis cannot be read."""
    now = time.time()
    last = int(now // 60)
    minutes = live_usage.read_minutes(redis_client(), range(last - 59, last + 1))
    chart = usage_chart(minutes or {}, now)
    return JsonResponse({**chart, "unavailable": minutes is None})


@staff_member_required
def dashboard_data(request: HttpRequest) -> JsonResponse:
    return JsonResponse(current_payload())


@staff_member_required
def requests(request: HttpRequest) -> HttpResponse:
    page = requests_page.requests_page(request.GET)
    options = request_filter_options()
    context = {
        **admin.site.each_context(request),
        "title": "Requests",
        "page": page,
        "options": options,
        "statuses": requests_page.STATUSES.items(),
        "windows": [(value, label) for value, (_, label) in requests_page.WINDOWS.items()],
        "initial": {"records": page["records"], "selected": page["selected"]},
        "config": requests_page.page_config(page, options),
    }
    return render(request, "dashboard/requests.html", context)
