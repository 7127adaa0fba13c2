"""Fixtures that run RouterPanel for real: a migrated temporary SQLite database, the test Redis,
and the web process (uvicorn by default; daphne too, via ``routerpanel_server``'s parameters).

``stack`` gives a test a clean registry and helpers to set it up through the REST API, exactly as
an operator's automation would; simulated engines come from ``enginesim.testing``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.procs import EDGE, PYTHON, REPO_ROOT, free_port, running

API_TOKEN = "e2e1111111111111111111111111111111111111"
PROXY_KEY = "rp-e2e-proxy-key"

SERVERS = {
    "uvicorn": lambda port: [
        PYTHON,
        "-m",
        "uvicorn",
        "routerpanel.asgi:application",
        "--host=127.0.0.1",
        f"--port={port}",
        "--no-access-log",
        "--loop=uvloop",
        f"--http={EDGE}",
    ],
    "daphne": lambda port: [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "routerpanel.asgi:application"],
}


@pytest.fixture(scope="session")
def e2e_database(tmp_path_factory: pytest.TempPathFactory, redis_server: str) -> dict[str, str]:
    """A migrated SQLite file with an admin token (``API_TOKEN``) and a proxy key (``PROXY_KEY``);
    yields the environment for RouterPanel processes that use it."""
    path = tmp_path_factory.mktemp("e2e-db") / "routerpanel.sqlite3"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "routerpanel.settings",
        "ROUTERPANEL_SQLITE_PATH": str(path),
        "ROUTERPANEL_REDIS_URL": redis_server,
        "ROUTERPANEL_API_TOKEN": API_TOKEN,
        "ROUTERPANEL_DEMO_API_KEY": PROXY_KEY,
        "ROUTERPANEL_ADMIN_PASSWORD": "e2e-admin-password",
        "ROUTERPANEL_LOG_LEVEL": "WARNING",
        "ROUTERPANEL_MAX_BODY_BYTES": str(4 * 1024 * 1024),
    }
    subprocess.run([PYTHON, "manage.py", "migrate", "--noinput", "-v0"], cwd=REPO_ROOT, env=env, check=True)
    subprocess.run([PYTHON, "manage.py", "bootstrap"], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    return env


@pytest.fixture(scope="session", params=sorted(SERVERS))
def routerpanel_server(request: pytest.FixtureRequest, e2e_database: dict[str, str]) -> Iterator[str]:
    """RouterPanel's web process (``routerpanel.asgi``) on a free port; yields its base URL.

    Parametrised: the suite runs once under uvicorn (the default server) and once under daphne.
    """
    port = free_port()
    with running(SERVERS[request.param](port), port=port, env=e2e_database, timeout=60):
        base = f"http://127.0.0.1:{port}"
        httpx.get(base + "/health", timeout=10).raise_for_status()  # daphne: starts the watcher
        yield base


@dataclass
class Stack:
    """A running RouterPanel with a clean registry, and helpers to configure it over REST."""

    base: str
    database: Path
    api: httpx.Client
    redis_url: str
    key: str = PROXY_KEY

    @property
    def v1(self) -> str:
        return self.base + "/v1"

    def config_version(self) -> int:
        with contextlib.closing(sqlite3.connect(self.database)) as db:
            return db.execute("SELECT version FROM nodes_configversion WHERE id = 1").fetchone()[0]

    def snapshot_version(self) -> int:
        return httpx.get(self.base + "/health", timeout=5).json()["snapshot_version"]

    def health_versions(self) -> tuple[int, int]:
        """(the live node health's version in Redis, the one the web process routes by)."""
        published = int(redis.Redis.from_url(self.redis_url).get("routerpanel:health-states:version") or 0)
        applied = httpx.get(self.base + "/health", timeout=5).json()["health_version"] or 0
        return published, applied

    def settle(self, timeout: float = 5.0) -> float:
        """Wait until the web process routes with the current configuration and the current live
        node health (a node registered through the API is probed at once, docs/decisions/0008);
        returns the seconds waited."""
        started = time.monotonic()
        wanted = self.config_version()
        while self.snapshot_version() != wanted:
            if time.monotonic() - started > timeout:
                raise AssertionError(f"snapshot stuck at {self.snapshot_version()}, configuration is {wanted}")
            time.sleep(0.02)
        while (versions := self.health_versions())[1] < versions[0]:
            if time.monotonic() - started > timeout:
                raise AssertionError(f"live health stuck at version {versions[1]}, Redis has {versions[0]}")
            time.sleep(0.02)
        return time.monotonic() - started

    def add_node(self, url: str, models: list[str], *, settle: bool = True, **fields: Any) -> dict[str, Any]:
        response = self.api.post("/api/nodes/", json={"url": url, "models": models, **fields})
        assert response.status_code == 201, response.text
        if settle:
            self.settle()
        return response.json()

    def update_node(self, node_id: int, *, settle: bool = True, **fields: Any) -> dict[str, Any]:
        response = self.api.patch(f"/api/nodes/{node_id}/", json=fields)
        assert response.status_code == 200, response.text
        if settle:
            self.settle()
        return response.json()

    def add_alias(self, name: str, served_name: str, node: int | None = None) -> None:
        response = self.api.post("/api/aliases/", json={"name": name, "served_name": served_name, "node": node})
        assert response.status_code == 201, response.text
        self.settle()

    def set_policy(self, model: str = "", *, settle: bool = True, **fields: Any) -> None:
        rows = self.api.get("/api/route-policies/", params={"limit": 1000}).json()["results"]
        row = next((r for r in rows if r["model"] == model), None)
        if row is None:
            response = self.api.post("/api/route-policies/", json={"model": model, **fields})
            assert response.status_code == 201, response.text
        else:
            response = self.api.patch(f"/api/route-policies/{row['id']}/", json=fields)
            assert response.status_code == 200, response.text
        if settle:
            self.settle()

    def add_key(self, **fields: Any) -> str:
        response = self.api.post("/api/api-keys/", json={"name": f"k{time.monotonic_ns()}", **fields})
        assert response.status_code == 201, response.text
        self.settle()
        body = response.json()
        return body.get("key") or body.get("plaintext")

    def reset(self) -> None:
        """Delete every node, alias and per-model policy; put the default policy back to defaults."""
        for kind in ("nodes", "aliases"):
            for row in self.api.get(f"/api/{kind}/", params={"limit": 1000}).json()["results"]:
                self.api.delete(f"/api/{kind}/{row['id']}/")
        for row in self.api.get("/api/route-policies/", params={"limit": 1000}).json()["results"]:
            if row["model"]:
                self.api.delete(f"/api/route-policies/{row['id']}/")
        self.set_policy(
            "",
            strategy="round_robin",
            serving_mode="auto",
            retry_budget=2,
            connect_timeout=2.0,
            first_token_timeout=120.0,
            total_timeout=1800.0,
            settle=False,
        )
        self.settle()


@pytest.fixture
def stack(routerpanel_server: str, e2e_database: dict[str, str]) -> Iterator[Stack]:
    """The running RouterPanel with an empty registry (reset before each test)."""
    with httpx.Client(base_url=routerpanel_server, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10) as api:
        stack = Stack(
            base=routerpanel_server,
            database=Path(e2e_database["ROUTERPANEL_SQLITE_PATH"]),
            api=api,
            redis_url=e2e_database["ROUTERPANEL_REDIS_URL"],
        )
        stack.reset()
        yield stack
