"""WebSocket URL patterns (the live dashboard adds its consumer here)."""

from __future__ import annotations

websocket_urlpatterns: list = []
