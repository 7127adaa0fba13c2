from __future__ import annotations

from django.urls import path

from . import registration, views

urlpatterns = [
    path("status", views.StatusView.as_view(), name="compat-status"),
    path("add", views.AddView.as_view(), name="compat-add"),
    path("remove", views.RemoveView.as_view(), name="compat-remove"),
    path("terminate", views.TerminateView.as_view(), name="compat-terminate"),
    path("terminate_all", views.TerminateAllView.as_view(), name="compat-terminate-all"),
]

# Under /register/<token>/nodes/: a control plane's registration URL (see registration.py).
register_urlpatterns = [
    path("add", registration.RegisterAddView.as_view(), name="register-add"),
    path("remove", registration.RegisterRemoveView.as_view(), name="register-remove"),
    path("status", registration.RegisterStatusView.as_view(), name="register-status"),
]
