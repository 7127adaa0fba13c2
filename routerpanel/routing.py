"""WebSocket URL patterns: the live dashboard's feed (session-authenticated, staff only)."""

from __future__ import annotations

from dashboard.routing import websocket_urlpatterns as dashboard_websockets

websocket_urlpatterns: list = [*dashboard_websockets]
