"""WebSocket URL patterns: the live dashboard's feed (session-authenticated, staff only)."""

from __future__ import annotations

from channels.auth import AuthMiddlewareStack
from django.urls import path

from nodes.consumers import DashboardConsumer

websocket_urlpatterns: list = [
    path("ws/dashboard/", AuthMiddlewareStack(DashboardConsumer.as_asgi())),
]
