"""The one process-stack factory: RouterPanel's processes for real, for tests through real sockets
(Redis and NanoCtrl on their own: ``RedisServer`` and ``NanoCtrl`` in tests/support/procs.py).

A ``StackSpec`` says what a test needs: the web server (uvicorn or daphne), a Celery worker and
beat, the registry listener, the prober, a NanoCtrl, a Redis of its own, and settings. ``StackPool.get(spec)``
starts such a stack on free ports with a fresh database, or hands back the one already running for
an equal spec: stacks live for the whole session, and a test resets what it changed through the
REST API (``RouterPanelStack.reset``) instead of restarting processes.

Every stack runs on a fresh SQLite file copied from one migrated and bootstrapped template (one
``migrate`` per session, not one per stack), with the same admin password, REST API token
(``TOKEN``) and proxy key (``PROXY_KEY``), and on a Redis database of its own (the session's Redis
has one per stack) unless it asked for its own Redis server.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from nodes.live.keys import HEALTH_VERSION
from tests.support.ports import closed_port, free_port
from tests.support.procs import (
    PYTHON,
    REPO_ROOT,
    NanoCtrl,
    RedisServer,
    celery_argv,
    listener_argv,
    prober_argv,
    running,
    wait_for_port,
    web_argv,
)
from tests.support.wait import wait_until

__all__ = [
    "ADMIN_PASSWORD",
    "FULL_STACK",
    "PROXY_KEY",
    "TOKEN",
    "RouterPanelStack",
    "StackPool",
    "StackSpec",
    "inherited_environment",
]

TOKEN = "e2e1111111111111111111111111111111111111"
PROXY_KEY = "rp-e2e-proxy-key"
ADMIN_PASSWORD = "e2e-admin-password"

# Every stack's settings unless its spec says otherwise: quiet logs, and a body limit small enough
# for a test to exceed it cheaply (the OpenAI-shaped 413).
BASE_SETTINGS = {"ROUTERPANEL_LOG_LEVEL": "WARNING", "ROUTERPANEL_MAX_BODY_BYTES": str(4 * 1024 * 1024)}

# The session Redis's databases: 0 and 1 belong to the unit tests (tests/conftest.py), the rest to
# stacks, one each. redis-server is started with this many.
REDIS_DATABASES = 32
FIRST_STACK_DATABASE = 2


@dataclass(frozen=True)
class StackSpec:
    """What a test needs running. Equal specs share one stack for the whole session."""

    server: str = "uvicorn"  # the web server: "uvicorn" or "daphne"
    web_processes: int = 1  # separate web processes on the one database and Redis (base, then others)
    celery: bool = False  # a Celery worker and beat: the registry sync and the key-usage flush
    listener: bool = False  # `manage.py listen_registry`: NanoCtrl's change events
    prober: bool = (
        False  # `manage.py run_prober`: the active health checks (docs/decisions/0008-health-as-live-state.md)
    )
    nanoctrl: bool = False  # a real NanoCtrl on the stack's Redis server
    own_redis: bool = False  # a Redis server of its own, which the test may stop and start
    settings: Mapping[str, str] | tuple[tuple[str, str], ...] = ()  # ROUTERPANEL_* for every process

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", tuple(sorted(dict(self.settings).items())))


# Every process of `make run` but the demo fleet: web, Celery worker and beat, the registry listener,
# the prober and NanoCtrl (a registry call to a NanoCtrl that a test stopped fails within 2 s).
FULL_STACK = StackSpec(
    celery=True, listener=True, prober=True, nanoctrl=True, settings={"ROUTERPANEL_REGISTRY_TIMEOUT": "2"}
)


@dataclass
class RouterPanelStack:
    """A running RouterPanel (per its ``spec``), and helpers to configure it over REST, exactly as
    an operator's automation would."""

    spec: StackSpec
    directory: Path
    env: dict[str, str]
    bases: list[str]
    redis_server: RedisServer | None
    nanoctrl: NanoCtrl | None
    api: httpx.Client
    _processes: contextlib.ExitStack = field(repr=False)
    _extra_webs: dict[str, int] = field(default_factory=dict, repr=False)
    token: str = TOKEN
    key: str = PROXY_KEY

    @property
    def base(self) -> str:
        return self.bases[0]

    @property
    def v1(self) -> str:
        return self.base + "/v1"

    @property
    def database(self) -> Path:
        return Path(self.env["ROUTERPANEL_SQLITE_PATH"])

    @property
    def redis_url(self) -> str:
        return self.env["ROUTERPANEL_REDIS_URL"]

    def close(self) -> None:
        self.api.close()
        self._processes.close()

    @contextlib.contextmanager
    def web(self, *, workers: int = 1, server: str = "uvicorn") -> Iterator[str]:
        """Another web process (of ``workers`` workers) on this stack's database and Redis for the
        ``with`` block; yields its URL. ``settle`` waits for each of its workers too."""
        with self.web_process(workers=workers, server=server) as (base, _):
            yield base

    @contextlib.contextmanager
    def web_process(
        self, *, workers: int = 1, server: str = "uvicorn", extra_args: Sequence[str] = ()
    ) -> Iterator[tuple[str, subprocess.Popen]]:
        """``web``, with more command-line arguments (``extra_args``), yielding the process too (the
        supervisor of several workers), for a test that signals it."""
        port = free_port()
        argv = [*web_argv(port, server=server, workers=workers), *extra_args]
        with running(argv, port=port, env=self.env, timeout=60) as proc:
            base = f"http://127.0.0.1:{port}"
            self._extra_webs[base] = workers
            try:
                yield base, proc
            finally:
                del self._extra_webs[base]

    @contextlib.contextmanager
    def admin_session(self) -> Iterator[httpx.Client]:
        """An HTTP client logged in to the admin as the bootstrap superuser, for the ``with`` block."""
        with httpx.Client(base_url=self.base, timeout=10) as client:
            client.get("/admin/login/")
            csrf = client.cookies["csrftoken"]
            login = {"username": "admin", "password": ADMIN_PASSWORD, "csrfmiddlewaretoken": csrf}
            response = client.post("/admin/login/", data=login, headers={"Referer": f"{self.base}/admin/login/"})
            assert response.status_code == 302, response.text
            yield client

    def config_version(self) -> int:
        with contextlib.closing(sqlite3.connect(self.database)) as db:
            return db.execute("SELECT version FROM nodes_configversion WHERE id = 1").fetchone()[0]

    def snapshot_version(self, base: str | None = None) -> int:
        return httpx.get((base or self.base) + "/health", timeout=5).json()["snapshot_version"]

    def health_version(self) -> int:
        """The version of the live node health in Redis (docs/decisions/0008-health-as-live-state.md)."""
        with contextlib.closing(redis.Redis.from_url(self.redis_url)) as client:
            return int(client.get(HEALTH_VERSION) or 0)

    def settle(self, timeout: float = 5.0) -> float:
        """Wait until every web worker routes with the current configuration (or a later one) and
        the current live node health (a node registered through the API is probed at once,
        docs/decisions/0008-health-as-live-state.md); returns the seconds waited. A process of
        several workers is asked over a new connection each time, until each of its workers (told
        apart by pid) has answered with those versions."""
        started = time.monotonic()
        wanted = self.config_version()
        health_wanted = self.health_version()
        webs = {**dict.fromkeys(self.bases, 1), **self._extra_webs}
        for base, workers in webs.items():
            current: set[int] = set()

            def settled(base: str = base, workers: int = workers, current: set[int] = current) -> bool:
                with httpx.Client(timeout=5) as client:  # a new connection: the kernel picks a worker
                    health = client.get(base + "/health").json()
                if health["snapshot_version"] >= wanted and (health["health_version"] or 0) >= health_wanted:
                    current.add(health["pid"])
                return len(current) >= workers

            wait_until(
                settled,
                timeout,
                f"{base}: not every worker reached configuration version {wanted} and health version {health_wanted}",
            )
        return time.monotonic() - started

    def add_node(self, url: str, models: list[str], *, settle: bool = True, **fields: Any) -> dict[str, Any]:
        response = self.api.post("/api/nodes/", json={"url": url, "models": models, **fields})
        assert response.status_code == 201, response.text
        if settle:
            self.settle()
        return response.json()

    def add_live_node(self, url: str, models: list[str], **fields: Any) -> dict[str, Any]:
        """``add_node`` for an engine that is up: its registration probe can time out on a loaded
        machine, and a stack with no prober would then never route to it, so it is probed again
        (through the API, as an operator would) until it is healthy, then every worker settles."""
        node = self.add_node(url, models, settle=False, **fields)

        def healthy() -> bool:
            if node.get("health") == "healthy":
                return True
            response = self.api.post(f"/api/nodes/{node['id']}/probe/")
            assert response.status_code == 200, response.text
            node.update(response.json())
            return node.get("health") == "healthy"

        wait_until(healthy, 15, f"{url} never probed healthy: {node}")
        self.settle()
        return node

    def update_node(self, node_id: int, *, settle: bool = True, **fields: Any) -> dict[str, Any]:
        response = self.api.patch(f"/api/nodes/{node_id}/", json=fields)
        assert response.status_code == 200, response.text
        if settle:
            self.settle()
        return response.json()

    def node(self, node_id: int) -> dict[str, Any]:
        response = self.api.get(f"/api/nodes/{node_id}/")
        assert response.status_code == 200, response.text
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
        """Delete every node, alias, per-model policy and control plane; put the default policy
        back to its defaults; wait until the web processes route with the result."""
        for kind in ("control-planes", "nodes", "aliases"):
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


def inherited_environment() -> dict[str, str]:
    """This process's environment without anything that would configure RouterPanel: a developer's
    ROUTERPANEL_* or DATABASE_URL must not reach a stack (the PostgreSQL pass of `make test` sets
    DATABASE_URL; stacks always run on SQLite files of their own)."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("ROUTERPANEL_") and name not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")
    }


class StackPool:
    """Starts stacks on first use and keeps them until no test left in the session needs them
    (tests/conftest.py calls ``stop``); ``close`` stops them all."""

    STASH = pytest.StashKey["StackPool"]()  # where the session's pool is kept, for pytest's hooks

    def __init__(self, directory: Path, redis_server: RedisServer) -> None:
        self.directory = directory
        self.redis_server = redis_server
        self._stacks: dict[StackSpec, RouterPanelStack] = {}
        self._template: Path | None = None
        self._next_database = FIRST_STACK_DATABASE
        self._started = 0

    def environment(self, directory: Path, redis_url: str, settings: Mapping[str, str] = ()) -> dict[str, str]:
        """The environment of RouterPanel processes on the SQLite file in ``directory``."""
        return {
            **inherited_environment(),
            "DJANGO_SETTINGS_MODULE": "routerpanel.settings",
            "ROUTERPANEL_SQLITE_PATH": str(directory / "db.sqlite3"),
            "ROUTERPANEL_REDIS_URL": redis_url,
            "ROUTERPANEL_API_TOKEN": TOKEN,
            "ROUTERPANEL_DEMO_API_KEY": PROXY_KEY,
            "ROUTERPANEL_ADMIN_PASSWORD": ADMIN_PASSWORD,
            **BASE_SETTINGS,
            **dict(settings),
        }

    def fresh_database(self, directory: Path) -> Path:
        """A migrated and bootstrapped SQLite file in ``directory`` (a copy of the session's template)."""
        if self._template is None:
            template_dir = self.directory / "template"
            template_dir.mkdir()
            env = self.environment(template_dir, f"redis://127.0.0.1:{closed_port()}/0")
            manage = [PYTHON, "manage.py"]
            subprocess.run([*manage, "migrate", "--noinput", "-v0"], cwd=REPO_ROOT, env=env, check=True)
            subprocess.run([*manage, "bootstrap"], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
            self._template = template_dir / "db.sqlite3"
        target = directory / "db.sqlite3"
        with (
            contextlib.closing(sqlite3.connect(self._template)) as source,
            contextlib.closing(sqlite3.connect(target)) as copy,
        ):
            source.backup(copy)
        return target

    def get(self, spec: StackSpec) -> RouterPanelStack:
        """The running stack for ``spec``, started now if there is none yet."""
        if spec not in self._stacks:
            self._stacks[spec] = self._start(spec)
        return self._stacks[spec]

    def _start(self, spec: StackSpec) -> RouterPanelStack:
        self._started += 1
        directory = self.directory / f"stack-{self._started}"
        directory.mkdir()
        processes = contextlib.ExitStack()
        try:
            own_redis = None
            if spec.own_redis:
                own_redis = RedisServer(directory).start()
                processes.callback(own_redis.stop)
                redis_url = own_redis.url(0)
            else:
                if self._next_database >= REDIS_DATABASES:
                    raise RuntimeError(f"more than {REDIS_DATABASES - FIRST_STACK_DATABASE} stacks in one session")
                redis_url = self.redis_server.url(self._next_database)
                self._next_database += 1
                redis.Redis.from_url(redis_url).flushdb()
            self.fresh_database(directory)
            env = self.environment(directory, redis_url, dict(spec.settings))
            nanoctrl = None
            if spec.nanoctrl:
                nanoctrl = NanoCtrl(redis_url.rsplit("/", 1)[0]).start()
                processes.callback(nanoctrl.stop)
            ports = [free_port() for _ in range(spec.web_processes)]
            webs = [processes.enter_context(running(web_argv(port, server=spec.server), env=env)) for port in ports]
            if spec.celery:
                processes.enter_context(running(celery_argv("worker", "--concurrency=1"), env=env))
                processes.enter_context(running(celery_argv("beat", "-s", str(directory / "beat")), env=env))
            if spec.listener:
                processes.enter_context(running(listener_argv(), env=env))
            if spec.prober:
                processes.enter_context(running(prober_argv(), env=env))
            bases = []
            for port, proc in zip(ports, webs, strict=True):
                wait_for_port(port, proc=proc, timeout=60)
                base = f"http://127.0.0.1:{port}"
                httpx.get(base + "/health", timeout=10).raise_for_status()  # daphne starts the watcher lazily
                bases.append(base)
            api = httpx.Client(base_url=bases[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        except BaseException:
            processes.close()
            raise
        return RouterPanelStack(
            spec=spec,
            directory=directory,
            env=env,
            bases=bases,
            redis_server=own_redis,
            nanoctrl=nanoctrl,
            api=api,
            _processes=processes,
        )

    def stop(self, spec: StackSpec) -> None:
        """Stop the stack for ``spec`` (no test needs it any more); a later ``get`` starts a new one."""
        stack = self._stacks.pop(spec, None)
        if stack is not None:
            stack.close()

    def close(self) -> None:
        while self._stacks:
            _, stack = self._stacks.popitem()
            stack.close()
