from __future__ import annotations

from django.apps import AppConfig


class ProxyConfig(AppConfig):
    """The data path: OpenAI-compatible proxying, routing and PD orchestration."""

    name = "proxy"
    verbose_name = "Proxy"
