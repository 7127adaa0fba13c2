"""The dashboard's WebSocket route (session-authenticated, staff only; see ``dashboard.consumers``)."""

from __future__ import annotations

from channels.auth import AuthMiddlewareStack
from django.urls import path

from .consumers import DashboardConsumer
from .payload import WEBSOCKET_PATH

websocket_urlpatterns = [
    path(WEBSOCKET_PATH.lstrip("/"), AuthMiddlewareStack(DashboardConsumer.as_asgi())),
]
