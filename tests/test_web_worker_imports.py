"""A web worker imports only what it serves with (routerpanel/lean.py): on SQLite, neither psycopg
nor the test tools' requests and Pygments, which DRF would import with the first REST API request
and which cost each worker about 16 MB; on PostgreSQL, DRF still maps PostgreSQL's fields.

Each case runs in a fresh interpreter, as a worker starts: the ASGI application, then the URLconf
(what Django's handler imports with the first page or REST API request)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import json, sys
import routerpanel.asgi, routerpanel.urls
from rest_framework import compat
loaded = sorted({name.split(".")[0] for name in sys.modules} & {"psycopg", "psycopg2", "requests", "pygments"})
import requests  # still importable once the worker is up
print(json.dumps({"loaded": loaded, "postgres_fields": compat.postgres_fields is not None}))
"""


def worker_imports(tmp_path: Path, **env: str) -> dict:
    environment = {
        key: value for key, value in os.environ.items() if key not in {"DATABASE_URL", "ROUTERPANEL_DATABASE_URL"}
    }
    environment.update(
        DJANGO_SETTINGS_MODULE="routerpanel.settings",
        ROUTERPANEL_SQLITE_PATH=str(tmp_path / "imports.sqlite3"),
        ROUTERPANEL_STATIC_ROOT=str(tmp_path / "static"),
        **env,
    )
    done = subprocess.run(
        [sys.executable, "-c", WORKER], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_web_worker_on_sqlite_never_imports_psycopg_requests_or_pygments(tmp_path: Path) -> None:
    assert worker_imports(tmp_path) == {"loaded": [], "postgres_fields": False}


def test_a_web_worker_on_postgresql_keeps_drfs_postgresql_fields(tmp_path: Path) -> None:
    # Django connects on the first query, never at set-up: no server is needed to import the worker.
    imports = worker_imports(tmp_path, DATABASE_URL="postgresql://routerpanel:secret@127.0.0.1:1/routerpanel")
    assert imports == {"loaded": ["psycopg"], "postgres_fields": True}
