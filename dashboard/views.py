"""The dashboard's pages: ``/dashboard/`` (staff only) and the same data as JSON at ``/dashboard/data``."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse

from .payload import current_payload, page_config


@staff_member_required
def dashboard(request: HttpRequest) -> HttpResponse:
    context = {
        **admin.site.each_context(request),
        "title": "Fleet dashboard",
        "initial": current_payload(),
        "config": page_config(data_path=reverse("dashboard-data")),
    }
    return render(request, "dashboard/index.html", context)


@staff_member_required
def dashboard_data(request: HttpRequest) -> JsonResponse:
    return JsonResponse(current_payload())
