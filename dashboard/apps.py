from __future__ import annotations

from django.apps import AppConfig


class DashboardConfig(AppConfig):
    """The live operator dashboard: the registry joined with the live state the web workers share."""

    name = "dashboard"
    verbose_name = "Dashboard"
