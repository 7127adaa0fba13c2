"""The RouterPanel that ``make bench`` and ``make bench-instructions`` measure: production settings
on loopback, a database of its own, and the credentials the load uses."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.procs import PYTHON, REPO_ROOT

API_TOKEN = "bench000000000000000000000000000000000000"
PROXY_KEY = "rp-bench-proxy-key"
MODEL = "sim-model"


def production_env(tmp: Path, redis_port: int, **extra: str) -> dict[str, str]:
    """This process's environment with RouterPanel's production settings (no debug, plain HTTP on
    loopback), a SQLite database in ``tmp``, the Redis on ``redis_port`` and the bench's
    credentials; ``extra`` adds or overrides settings."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "routerpanel.settings",
        "ROUTERPANEL_SQLITE_PATH": str(tmp / "bench.sqlite3"),
        "ROUTERPANEL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "ROUTERPANEL_API_TOKEN": API_TOKEN,
        "ROUTERPANEL_DEMO_API_KEY": PROXY_KEY,
        "ROUTERPANEL_LOG_LEVEL": "WARNING",
        "ROUTERPANEL_DEBUG": "0",
        "ROUTERPANEL_SECRET_KEY": "bench-secret-key-not-for-production",
        "ROUTERPANEL_SECURE_SSL_REDIRECT": "0",  # plain HTTP on loopback
        "ROUTERPANEL_SECURE_COOKIES": "0",
        **extra,
    }


def prepare_database(env: dict[str, str]) -> None:
    """Migrate the database ``env`` names and create the bench's token and proxy key in it."""
    subprocess.run([PYTHON, "manage.py", "migrate", "--noinput", "-v0"], cwd=REPO_ROOT, env=env, check=True)
    subprocess.run([PYTHON, "manage.py", "bootstrap"], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
