"""Run the NanoCtrl registry server (from the ``nanoctrl`` package) once its Redis accepts
connections; used by `make run`'s Procfile."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from django.core.management.base import BaseCommand, CommandError, CommandParser


def nanoctrl_binary() -> str:
    found = shutil.which("nanoctrl") or str(Path(sys.executable).with_name("nanoctrl"))
    if not Path(found).exists():
        raise CommandError("The nanoctrl binary is missing: pip install nanoctrl.")
    return found


class Command(BaseCommand):
    help = "Wait for Redis, then run `nanoctrl server` in the foreground."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=4479)
        parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
        parser.add_argument("--wait", type=float, default=30.0, help="Seconds to wait for Redis.")

    def handle(self, *args: object, host: str, port: int, redis_url: str, wait: float, **options: object) -> None:
        parts = urlsplit(redis_url)
        deadline = time.monotonic() + wait
        while True:
            try:
                socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise CommandError(f"Redis at {parts.hostname}:{parts.port} did not come up in {wait} s") from None
                time.sleep(0.2)
        binary = nanoctrl_binary()
        argv = [binary, "server", "--host", host, "--port", str(port), "--redis-url", redis_url]
        os.execv(binary, argv)
