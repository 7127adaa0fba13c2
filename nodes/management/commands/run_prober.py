"""Long-running: probe every node's /health on its interval and publish node health as live state
(`make run` starts it; one per deployment, see docs/deployment.md)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from nodes.prober.process import Prober


def _raise_open_file_limit() -> None:
    """One kept-alive connection per node: a fleet of thousands needs more than the usual 1,024
    descriptors. Raise the soft limit to the hard one (no privilege needed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Command(BaseCommand):
    help = "Probe the nodes' /health on their intervals and publish their health to the web workers."
    requires_system_checks: list[str] = []  # a restart after a crash should be quick; `manage.py check` is CI's

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--concurrency",
            type=int,
            default=settings.ROUTERPANEL_PROBER_CONCURRENCY,
            help="Probes in flight at most (ROUTERPANEL_PROBER_CONCURRENCY).",
        )
        parser.add_argument(
            "--max-lag",
            type=float,
            default=settings.ROUTERPANEL_PROBER_MAX_LAG,
            help="Seconds of the prober's own lateness beyond which a probe decides nothing.",
        )

    def handle(self, *args: Any, concurrency: int, max_lag: float, **options: Any) -> None:
        _raise_open_file_limit()
        prober = Prober(
            settings.ROUTERPANEL_REDIS_URL,
            concurrency=concurrency,
            max_lag=max_lag,
            flush_interval=settings.ROUTERPANEL_PROBER_FLUSH_INTERVAL,
            history=settings.ROUTERPANEL_HEALTH_HISTORY,
        )

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            await prober.run(stop)

        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
            asyncio.run(main())
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main())
