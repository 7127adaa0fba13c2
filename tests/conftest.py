"""Shared fixtures: a real Redis, RouterPanel's processes (tests/support/stack.py), and the
personas for permission tests (admin, operator, outsider).

Tests through real processes ask for ``stack``: a running RouterPanel (started by the session's
``stacks``) with an empty registry. A module that needs more than the web process under uvicorn says
so with a marker, ``pytestmark = pytest.mark.stack(StackSpec(...))``; modules with equal specs share
one stack, which is stopped once the last test that needs it has run. A test marked
``@pytest.mark.servers("uvicorn", "daphne")`` runs once per web server: the daphne smoke set, which
keeps daphne covered without running every test twice.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import defaultdict
from collections.abc import Iterator

import pytest
import redis as redis_lib
from asgiref.sync import SyncToAsync
from django.contrib.auth import get_user_model
from django.db import connection, connections

from nodes.services import Actor
from tests.support.layers import channel_layers_at
from tests.support.ports import closed_port
from tests.support.procs import RedisServer
from tests.support.stack import REDIS_DATABASES, RouterPanelStack, StackPool, StackSpec


@pytest.fixture(autouse=True)
def _asgiref_thread_disconnected() -> Iterator[None]:
    """An async test's ORM calls through ``sync_to_async`` run in asgiref's one shared thread, whose
    database connections would stay open to the end of the session: on PostgreSQL pytest-django
    then cannot drop the test database ("being accessed by other users"). Closed after each test."""
    yield
    SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=30)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real, private ``redis-server`` on a free port for the whole test session. Database 0 holds
    the NanoCtrls' registries, database 1 the unit tests' (``redis_url``), the others one stack each."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), databases=REDIS_DATABASES).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def stacks(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[StackPool]:
    """RouterPanel's processes for real (tests/support/stack.py): ``stacks.get(StackSpec(...))``
    starts a stack on first use and shares it; all are stopped at the session's end at the latest."""
    pool = StackPool(tmp_path_factory.mktemp("stacks"), redis_server)
    request.config.stash[StackPool.STASH] = pool
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def redis_url(redis_server: RedisServer, settings) -> Iterator[str]:
    """Point the project at the test Redis (database 1, flushed before each test) and yield its URL."""
    url = redis_server.url(1)
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
    """Unless a test asks for Redis, aim the project (its shared state, Celery's broker and the
    channel layer) at a port that refuses connections, so nothing reaches a Redis that happens to
    run on the machine (`make test` exports ROUTERPANEL_REDIS_URL=redis://127.0.0.1:6379/0)."""
    if "redis_url" not in request.fixturenames and "redis_server" not in request.fixturenames:
        closed = f"redis://127.0.0.1:{closed_port()}/0"
        settings.ROUTERPANEL_REDIS_URL = closed
        settings.CELERY_BROKER_URL = closed
        settings.CHANNEL_LAYERS = channel_layers_at(settings.CHANNEL_LAYERS, closed)


DATABASE_FIXTURES = {"db", "transactional_db", "django_db_reset_sequences", "django_db_serialized_rollback"}


def uses_the_database(item: pytest.Item) -> bool:
    """Whether pytest-django lets the test reach the database (it blocks every other test's access)."""
    return item.get_closest_marker("django_db") is not None or bool(
        DATABASE_FIXTURES & set(getattr(item, "fixturenames", ()))
    )


def xdist_group(item: pytest.Item) -> str | None:
    """The group of tests pytest-xdist (`make test` runs the suite with ``-n``) must run on one
    worker, in their order: the real-engine tier (its vLLM servers start once, in the order its
    conftest sets); the tests of one stack spec but the plain one (the worker starts that stack
    once); each other end-to-end module (its module fixtures start their processes once). Each
    worker that runs a module on the plain stack starts a plain stack of its own: seconds, where
    one group for all those modules would run them one after the other. None: any worker."""
    if item.get_closest_marker("real_engine") is not None:
        return "real-engines"
    spec = spec_of(item)
    if spec is not None and spec != StackSpec():
        return f"stack-{zlib.crc32(repr(spec).encode()):08x}"  # the same name in every worker
    if spec is not None or item.get_closest_marker("e2e") is not None:
        return item.path.relative_to(item.config.rootpath).as_posix()
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Transactional tests flush every table afterwards, which would drop the rows the data
    migrations seed (the global route policy, the configuration version) for every later test:
    have them restore the database instead (serialized rollback). Each test gets its
    ``xdist_group``.

    On PostgreSQL (the second pass of `make test`, after the whole suite ran on SQLite) only the
    tests that use the database run: the others cannot tell the two apart."""
    for item in items:
        group = xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        marker = item.get_closest_marker("django_db")
        if marker is not None and marker.kwargs.get("transaction") and not marker.kwargs.get("serialized_rollback"):
            item.add_marker(pytest.mark.django_db(**{**marker.kwargs, "serialized_rollback": True}), append=False)
    if connection.vendor == "postgresql":
        unchanged = [item for item in items if not uses_the_database(item)]
        if unchanged:
            config.hook.pytest_deselected(items=unchanged)
            items[:] = [item for item in items if uses_the_database(item)]


# For each test, the stacks to stop after it: those it is the last test to need.
STOP_AFTER = pytest.StashKey[dict[str, list[StackSpec]]]()


def marked_spec(node: pytest.Item) -> StackSpec:
    marker = node.get_closest_marker("stack")
    return marker.args[0] if marker is not None else StackSpec()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("servers")
    if marker is not None and "stack_spec" in metafunc.fixturenames:
        base = marked_spec(metafunc.definition)
        specs = [dataclasses.replace(base, server=server) for server in marker.args]
        metafunc.parametrize("stack_spec", specs, ids=list(marker.args))


def spec_of(item: pytest.Item) -> StackSpec | None:
    """The stack a test runs against, known once it is collected (None: it needs none). A test
    needs one when its fixtures reach the session's ``stacks``, through ``stack`` or otherwise."""
    if "stacks" not in getattr(item, "fixturenames", ()):
        return None
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "stack_spec" in callspec.params:
        return callspec.params["stack_spec"]
    return marked_spec(item)


def pytest_collection_finish(session: pytest.Session) -> None:
    last_user: dict[StackSpec, str] = {}
    for item in session.items:
        spec = spec_of(item)
        if spec is not None:
            last_user[spec] = item.nodeid
    stop_after: dict[str, list[StackSpec]] = defaultdict(list)
    for spec, nodeid in last_user.items():
        stop_after[nodeid].append(spec)
    session.config.stash[STOP_AFTER] = dict(stop_after)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Stop the stacks no later test needs, after this test's (and its module's) fixtures are gone:
    an idle stack's processes still cost a few per cent of a core each."""
    specs = item.config.stash.get(STOP_AFTER, {}).get(item.nodeid, [])
    pool = item.config.stash.get(StackPool.STASH, None)
    for spec in specs if pool is not None else ():
        pool.stop(spec)


@pytest.fixture
def stack_spec(request: pytest.FixtureRequest) -> StackSpec:
    """What ``stack`` runs: the ``stack`` marker's spec, else RouterPanel's web process under uvicorn."""
    return marked_spec(request.node)


@pytest.fixture
def stack(stacks: StackPool, stack_spec: StackSpec) -> RouterPanelStack:
    """The running RouterPanel for ``stack_spec`` with an empty registry (reset before each test)."""
    running = stacks.get(stack_spec)
    running.reset()
    return running


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
