"""Long-running: apply NanoCtrl's change events within a second (`make run` starts it)."""

from __future__ import annotations

import signal
import threading

from django.core.management.base import BaseCommand, CommandParser

from nodes.listener import RegistryListener


class Command(BaseCommand):
    help = "Listen to the control planes' registry events on Redis and apply them to the node table."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--reload-interval", type=float, default=5.0, help="Seconds between control plane reloads.")

    def handle(self, *args: object, reload_interval: float, **options: object) -> None:
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        RegistryListener(reload_interval=reload_interval).run(stop)
