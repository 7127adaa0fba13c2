"""Shared fixtures: a real Redis, and the personas for permission tests (admin, operator, outsider)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
import redis as redis_lib
from django.contrib.auth import get_user_model

from nodes.localredis import redis_server_argv
from nodes.services import Actor
from tests.procs import free_port, redis_db, stop_process, wait_for_port


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real, private ``redis-server`` on a free port for the whole test session; yields its URL."""
    port = free_port()
    data_dir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        redis_server_argv(port=port, data_dir=data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_for_port(port, proc=proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc)


@pytest.fixture
def redis_url(redis_server: str, settings) -> Iterator[str]:
    """Point the project at the test Redis (database 1, flushed before each test) and yield its URL.
    Database 0 belongs to the end-to-end suite's long-lived RouterPanel server."""
    url = redis_db(redis_server, 1)
    client = redis_lib.Redis.from_url(url)
    client.flushdb()
    settings.ROUTERPANEL_REDIS_URL = url
    yield url
    client.close()


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings) -> None:
    """Personas are created in many tests; the production hasher is deliberately slow."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _no_real_redis_by_default(settings, request) -> None:
    """Unless a test asks for Redis, aim the project at a closed port so nothing leaks to a Redis
    on 6379 that happens to run on the developer's machine."""
    if "redis_url" not in request.fixturenames and "redis_server" not in request.fixturenames:
        settings.ROUTERPANEL_REDIS_URL = "redis://127.0.0.1:1/0"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Transactional tests flush every table afterwards, which would drop the rows the data
    migrations seed (the global route policy, the configuration version) for every later test:
    have them restore the database instead (serialized rollback)."""
    for item in items:
        marker = item.get_closest_marker("django_db")
        if marker is not None and marker.kwargs.get("transaction") and not marker.kwargs.get("serialized_rollback"):
            item.add_marker(pytest.mark.django_db(**{**marker.kwargs, "serialized_rollback": True}), append=False)


@pytest.fixture
def admin_user(db):
    """A superuser: may do anything."""
    return get_user_model().objects.create_superuser("root", "root@example.com", "pw-admin-123")


@pytest.fixture
def operator_user(db):
    """A staff user without superuser rights: may read and change the registry through the API."""
    return get_user_model().objects.create_user("operator", "op@example.com", "pw-operator-123", is_staff=True)


@pytest.fixture
def outsider_user(db):
    """A logged-in user who is not staff: may read, never write."""
    return get_user_model().objects.create_user("outsider", "out@example.com", "pw-outsider-123")


@pytest.fixture
def system() -> Actor:
    """The actor for fixtures' own writes."""
    return Actor.system("tests")
