from __future__ import annotations

from django.apps import AppConfig


class NodesConfig(AppConfig):
    """The registry: nodes, model aliases, route policies, control planes and API keys."""

    name = "nodes"
    verbose_name = "Registry"
