"""``manage.py simulate_engine``: run a simulated inference engine (see ``enginesim``)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from enginesim.config import FleetError, add_arguments, configs_from_options
from enginesim.server import run


class Command(BaseCommand):
    requires_system_checks: list[str] = []  # the simulator uses no models; start fast
    help = "Run a simulated LLM engine (NanoDeploy, DLEngine, vLLM, SGLang, LMDeploy or OpenAI) for tests and demos."

    def add_arguments(self, parser) -> None:
        add_arguments(parser)

    def handle(self, *args, **options) -> None:
        try:
            configs = configs_from_options(options)
        except (FleetError, OSError) as exc:
            raise CommandError(str(exc)) from None
        run(configs)
