from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("status", views.StatusView.as_view(), name="compat-status"),
    path("add", views.AddView.as_view(), name="compat-add"),
    path("remove", views.RemoveView.as_view(), name="compat-remove"),
    path("terminate", views.TerminateView.as_view(), name="compat-terminate"),
    path("terminate_all", views.TerminateAllView.as_view(), name="compat-terminate-all"),
]
