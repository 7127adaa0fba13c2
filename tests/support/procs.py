"""Processes for tests: RouterPanel's command lines, starting a process with its output in a file,
waiting for it to listen, and stopping it and everything it started; a Redis server and a NanoCtrl
that a test may stop and start again."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from nodes.localredis import redis_server_argv
from tests.support.ports import free_port
from tests.support.wait import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BIN = Path(PYTHON).parent
# The HTTP protocol every web process runs with (the Procfile's, docs/deployment.md's).
EDGE = "routerpanel.httpedge:GuardedHttpToolsProtocol"


def web_argv(port: int, *, server: str = "uvicorn", workers: int = 1) -> list[str]:
    """RouterPanel's web process on ``port``: uvicorn as the Procfile starts it, or daphne."""
    if server == "daphne":
        if workers != 1:
            raise ValueError("daphne runs one process")
        return [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "routerpanel.asgi:application"]
    if server != "uvicorn":
        raise ValueError(f"unknown web server {server!r}")
    argv = [str(BIN / "uvicorn"), "routerpanel.asgi:application", "--host=127.0.0.1", f"--port={port}"]
    argv += ["--no-access-log", "--loop=uvloop", f"--http={EDGE}"]
    return [*argv, *([f"--workers={workers}"] if workers > 1 else [])]


def celery_argv(*args: str) -> list[str]:
    """A Celery process of RouterPanel's (``celery_argv("worker", "--concurrency=1")``)."""
    return [str(BIN / "celery"), "-A", "routerpanel", *args, "-l", "WARNING"]


def listener_argv() -> list[str]:
    """The registry listener, reloading its control planes every half second (new scopes show up fast)."""
    return [PYTHON, "manage.py", "listen_registry", "--reload-interval=0.5"]


def prober_argv() -> list[str]:
    """RouterPanel's prober (`manage.py run_prober`): the active health checks, one per deployment."""
    return [PYTHON, "manage.py", "run_prober"]


def nanoctrl_argv(port: int, redis_url: str) -> list[str]:
    """The real NanoCtrl server (the ``nanoctrl`` package's binary) on ``port``, keeping its
    registry in the Redis at ``redis_url``."""
    return [str(BIN / "nanoctrl"), "server", "--host=127.0.0.1", f"--port={port}", f"--redis-url={redis_url}"]


def output_of(proc: subprocess.Popen) -> str:
    """What a process printed: its log file (``running``) or its pipe, once it has exited."""
    log_path = getattr(proc, "log_path", None)
    if log_path is not None:
        return Path(log_path).read_text(errors="replace")
    return proc.stdout.read().decode(errors="replace") if proc.stdout else ""


def _accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def wait_for_port(
    port: int, *, host: str = "127.0.0.1", timeout: float = 15.0, proc: subprocess.Popen | None = None
) -> None:
    """Block until something accepts connections on ``host:port``; fail with the process's output
    if ``proc`` exits first."""

    def listening() -> bool:
        if proc is not None and proc.poll() is not None:
            out = output_of(proc)
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}:\n{out[-4000:]}")
        return _accepts(host, port)

    wait_until(listening, timeout, f"nothing listened on {host}:{port}")


def stop_process(proc: subprocess.Popen, *, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time; always reaps the process. A process that
    leads its own process group (``running`` starts them so) takes its group with it: whatever it
    started and did not stop itself (web workers, Celery's pool, honcho's children) is killed."""
    group = proc.pid if getattr(proc, "own_group", False) else None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    if group is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    *,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path = REPO_ROOT,
    timeout: float = 20.0,
) -> Iterator[subprocess.Popen]:
    """Start ``argv`` (with exactly ``env`` as its environment, else this process's), wait for
    ``port`` if given, and stop it and its process group on exit.

    Output goes to a temporary file (``proc.log_path``, read with ``output_of``), never a pipe: a
    chatty server whose pipe nobody drains would block on its next log line once the pipe is full.
    """
    with tempfile.NamedTemporaryFile(prefix="routerpanel-test-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(os.environ if env is None else env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.log_path = log.name  # type: ignore[attr-defined]
    proc.own_group = True  # type: ignore[attr-defined]
    try:
        if port is not None:
            wait_for_port(port, proc=proc, timeout=timeout)
        yield proc
    finally:
        stop_process(proc)
        with contextlib.suppress(OSError):
            os.unlink(log.name)


class RedisServer:
    """A private ``redis-server`` on a free port, which a test may stop and start again on the
    same port (its data is not kept across a restart)."""

    def __init__(self, data_dir: Path, *, databases: int = 16) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.databases = databases
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        argv = [*redis_server_argv(port=self.port, data_dir=self.data_dir), "--databases", str(self.databases)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class NanoCtrl:
    """The real NanoCtrl server on a free port, which a test may stop and start again on the same
    port; its registry lives in the Redis at ``redis_url``."""

    def __init__(self, redis_url: str) -> None:
        self.port = free_port()
        self.redis_url = redis_url
        self._running: contextlib.ExitStack | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> NanoCtrl:
        self._running = contextlib.ExitStack()
        self._running.enter_context(running(nanoctrl_argv(self.port, self.redis_url), port=self.port))
        return self

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()
            self._running = None

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return httpx.post(f"http://{self.address}/{path}", json=body, timeout=5).json()

    def entities(self, scope: str) -> dict[str, dict[str, Any]]:
        """The services registered in ``scope``, by entity id."""
        answer = self.post("list_entities", {"entity_type": "service", "scope": scope})
        assert answer["status"] == "ok", answer
        return {e["entity_id"]: e for e in answer["entities"]}
