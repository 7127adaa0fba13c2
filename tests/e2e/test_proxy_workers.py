"""Several web workers: each keeps its own routing snapshot, and all of them see a change within 1 s."""

from __future__ import annotations

import contextlib
import sqlite3
import time

import httpx
import pytest

from tests.procs import PYTHON, free_port, running

pytestmark = pytest.mark.e2e


def _versions(base: str, count: int) -> dict[int, set[int]]:
    """Worker pid -> snapshot versions it reported, over ``count`` fresh connections (the kernel
    spreads new connections over the workers)."""
    seen: dict[int, set[int]] = {}
    for _ in range(count):
        with httpx.Client(timeout=5) as client:  # a new connection each time
            health = client.get(base + "/health").json()
            seen.setdefault(health["pid"], set()).add(health["snapshot_version"])
    return seen


def _db_version(env: dict[str, str]) -> int:
    with contextlib.closing(sqlite3.connect(env["ROUTERPANEL_SQLITE_PATH"])) as db:
        return db.execute("SELECT version FROM nodes_configversion WHERE id = 1").fetchone()[0]


def test_every_worker_sees_a_configuration_change_within_a_second(e2e_database):
    port = free_port()
    argv = [
        PYTHON,
        "-m",
        "uvicorn",
        "routerpanel.asgi:application",
        "--host=127.0.0.1",
        f"--port={port}",
        "--workers=2",
        "--no-access-log",
    ]
    with (
        running(argv, port=port, env=e2e_database, timeout=60),
        httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {e2e_database['ROUTERPANEL_API_TOKEN']}"},
            timeout=10,
        ) as api,
    ):
        base = str(api.base_url).rstrip("/")
        deadline = time.monotonic() + 20
        while len(_versions(base, 8)) < 2:  # both workers are up and answering
            assert time.monotonic() < deadline, "the second worker never answered"
        for attempt in range(3):
            response = api.post("/api/aliases/", json={"name": f"workers-{time.monotonic_ns()}", "served_name": "x"})
            assert response.status_code == 201, response.text
            time.sleep(1.0)
            wanted = _db_version(e2e_database)
            seen = _versions(base, 24)
            assert all(versions == {wanted} for versions in seen.values()), (attempt, wanted, seen)
