"""Helpers for tests that run real processes: free ports, waiting for sockets, clean shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_db(url: str, index: int) -> str:
    """The same Redis server, another database: each end-to-end module that runs RouterPanel uses
    its own, so their configuration versions, shared counters and breakers (keyed by node ids that
    repeat across test databases) never mix."""
    return f"{url.rsplit('/', 1)[0]}/{index}"


def free_port_block(count: int) -> int:
    """The first of ``count`` consecutive ports that nobody listens on right now."""
    import random

    for _ in range(200):
        base = random.randint(20000, 60000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no block of {count} free ports found")


def output_of(proc: subprocess.Popen) -> str:
    """What a process printed: its log file (``running``) or its pipe, once it has exited."""
    log_path = getattr(proc, "log_path", None)
    if log_path is not None:
        return Path(log_path).read_text(errors="replace")
    return proc.stdout.read().decode(errors="replace") if proc.stdout else ""


def wait_for_port(port: int, *, host: str = "127.0.0.1", timeout: float = 15.0, proc: subprocess.Popen | None = None):
    """Block until something accepts connections on ``host:port``; fail with the process's output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = output_of(proc)
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}:\n{out[-4000:]}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout} s")


def stop_process(proc: subprocess.Popen, *, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time; always reaps the process."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    cwd: Path = REPO_ROOT,
    timeout: float = 20.0,
) -> Iterator[subprocess.Popen]:
    """Start ``argv``, wait for ``port`` if given, and stop it on exit.

    Output goes to a temporary file (``proc.log_path``, read with ``output_of``), never a pipe: a
    chatty server whose pipe nobody drains would block on its next log line once the pipe is full.
    """
    full_env = {**os.environ, **(env or {})}
    with tempfile.NamedTemporaryFile(prefix="routerpanel-test-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(
            list(argv), cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    proc.log_path = log.name  # type: ignore[attr-defined]
    try:
        if port is not None:
            wait_for_port(port, proc=proc, timeout=timeout)
        yield proc
    finally:
        stop_process(proc)
        with contextlib.suppress(OSError):
            os.unlink(log.name)


BIN = Path(PYTHON).parent
# The HTTP protocol every web process runs with (the Procfile's, docs/deployment.md's).
EDGE = "routerpanel.httpedge:GuardedHttpToolsProtocol"


def routerpanel_env(directory: Path, redis_url: str, *, token: str, proxy_key: str, **extra: str) -> dict[str, str]:
    """The environment for RouterPanel processes on a fresh SQLite database in ``directory``:
    migrated, with the ``admin`` user, REST API ``token`` and proxy key ``proxy_key`` bootstrapped."""
    env = {
        **os.environ,
        "ROUTERPANEL_SQLITE_PATH": str(directory / "db.sqlite3"),
        "ROUTERPANEL_REDIS_URL": redis_url,
        "ROUTERPANEL_API_TOKEN": token,
        "ROUTERPANEL_DEMO_API_KEY": proxy_key,
        "ROUTERPANEL_ADMIN_PASSWORD": "e2e-admin-password",
        "ROUTERPANEL_LOG_LEVEL": "WARNING",
        **extra,
    }
    subprocess.run([PYTHON, "manage.py", "migrate", "--noinput", "-v0"], cwd=REPO_ROOT, env=env, check=True)
    subprocess.run([PYTHON, "manage.py", "bootstrap"], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    return env


def uvicorn_argv(port: int) -> list[str]:
    """RouterPanel's web process as `make run` starts it, on ``port``."""
    return [
        str(BIN / "uvicorn"),
        "routerpanel.asgi:application",
        "--host=127.0.0.1",
        f"--port={port}",
        "--no-access-log",
        f"--http={EDGE}",
    ]


def celery_argv(*args: str) -> list[str]:
    """A Celery process of RouterPanel's (``celery_argv("worker", "--concurrency=1")``)."""
    return [str(BIN / "celery"), "-A", "routerpanel", *args, "-l", "WARNING"]


def prober_argv() -> list[str]:
    """RouterPanel's prober (`manage.py run_prober`): the active health checks, one per deployment."""
    return [PYTHON, "manage.py", "run_prober"]
