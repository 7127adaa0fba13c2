"""Several web workers: each keeps its own routing snapshot, and all of them see a change within 1 s."""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlsplit

import pytest

from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e


def _versions(base: str, count: int) -> dict[int, set[int]]:
    """Worker pid -> snapshot versions it reported, over ``count`` fresh connections (the kernel
    spreads new connections over the workers)."""
    address = urlsplit(base)
    seen: dict[int, set[int]] = {}
    for _ in range(count):
        # A new connection each time, and a cheap one: an httpx.Client per look builds an SSL context,
        # which on a busy machine made one look of 24 connections last longer than the second itself.
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=5)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            assert response.status == 200, response.status
            health = json.loads(response.read())
        finally:
            connection.close()
        seen.setdefault(health["pid"], set()).add(health["snapshot_version"])
    return seen


def test_every_worker_sees_a_configuration_change_within_a_second(stack):
    with stack.web(workers=2) as base:
        wait_until(lambda: len(_versions(base, 8)) >= 2, 20, "the second worker never answered")
        for _ in range(3):
            name = f"workers-{time.monotonic_ns()}"
            response = stack.api.post("/api/aliases/", json={"name": name, "served_name": "x"})
            assert response.status_code == 201, response.text
            wanted = stack.config_version()

            seen: dict[int, set[int]] = {}

            def current(wanted: int = wanted, seen: dict[int, set[int]] = seen) -> bool:
                seen.clear()
                seen.update(_versions(base, 24))
                return all(versions == {wanted} for versions in seen.values())

            # Within a second: the last try samples the workers once the second has passed.
            wait_until(current, 1.0, lambda wanted=wanted, seen=seen: f"not all at version {wanted}: {seen}")
