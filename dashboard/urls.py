"""The dashboard's HTTP routes (included at the site root by ``routerpanel.urls``)."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("dashboard/", views.dashboard, name="dashboard"),
    path("dashboard/data", views.dashboard_data, name="dashboard-data"),
    path("dashboard/usage", views.dashboard_usage, name="dashboard-usage"),
    path("dashboard/requests/", views.requests, name="dashboard-requests"),
]
