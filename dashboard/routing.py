"""The dashboard's WebSocket routes (session-authenticated, staff only; see ``dashboard.consumers``)."""

from __future__ import annotations

from channels.auth import AuthMiddlewareStack
from django.urls import path

from .consumers import DashboardConsumer, RequestsConsumer
from .payload import WEBSOCKET_PATH
from .requests import WEBSOCKET_PATH as REQUESTS_WEBSOCKET_PATH

websocket_urlpatterns = [
    # Channels routes ASGI applications with Django's path(), whose stubs accept only views.
    path(WEBSOCKET_PATH.lstrip("/"), AuthMiddlewareStack(DashboardConsumer.as_asgi())),  # type: ignore[arg-type]
    path(REQUESTS_WEBSOCKET_PATH.lstrip("/"), AuthMiddlewareStack(RequestsConsumer.as_asgi())),  # type: ignore[arg-type]
]
