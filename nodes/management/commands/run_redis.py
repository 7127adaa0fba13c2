"""Run a local Redis in the foreground (used by `make run`'s Procfile)."""

from __future__ import annotations

import os
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from nodes.localredis import redis_server_argv


class Command(BaseCommand):
    help = "Run a local, non-persistent redis-server in the foreground."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=6379)
        parser.add_argument("--host", default="127.0.0.1")

    def handle(self, *args: object, port: int, host: str, **options: object) -> None:
        data_dir = Path(settings.BASE_DIR) / "var" / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = redis_server_argv(port=port, host=host, data_dir=data_dir)
        # Replace this process so signals from the process runner reach Redis directly.
        os.execv(argv[0], argv)
