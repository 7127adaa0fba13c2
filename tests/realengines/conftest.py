"""Fixtures for the real-engine tier: real vLLM servers (CPU build) started from .venv-vllm.

- ``vllm_python``: the vLLM virtualenv's interpreter. Without it (``make vllm-env`` not run) the
  tests skip, unless ROUTERPANEL_REQUIRE_REAL_ENGINES is set (CI sets it), when they fail.
- ``vllm_models``: the tiny chat and embedding models, built without a download and cached.
- ``vllm_server(role=..., instance=0, extra_args=())``: a ready server for that spec, started once
  per session and reused; at most two run at a time (the least recently used one is stopped).
- ``vllm_pair``: the session's pair, prefill and decode, both ``kv_both`` with the ExampleConnector
  on one shared directory. Such a server also answers plain requests, so the pair doubles as two
  hybrid servers; tests that want servers without a connector ask ``vllm_server`` for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.realengines.harness import (
    ROLES,
    VLLM_PYTHON,
    ServerSpec,
    VllmFleet,
    VllmServer,
    build_models,
    real_engines_required,
)


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if VLLM_PYTHON.exists():
        return VLLM_PYTHON
    message = f"no vLLM virtualenv at {VLLM_PYTHON}: run `make vllm-env`"
    if real_engines_required():
        pytest.fail(f"{message} (ROUTERPANEL_REQUIRE_REAL_ENGINES is set)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def vllm_models(vllm_python: Path) -> dict[str, Path]:
    return build_models(vllm_python)


@pytest.fixture(scope="session")
def vllm_fleet(
    vllm_python: Path, vllm_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmFleet]:
    fleet = VllmFleet(python=vllm_python, models=vllm_models, log_dir=tmp_path_factory.mktemp("vllm-logs"))
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture(scope="session")
def vllm_kv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared storage of the session's ExampleConnector servers."""
    return tmp_path_factory.mktemp("vllm-kv")


@pytest.fixture(scope="session")
def vllm_server(vllm_fleet: VllmFleet, vllm_kv_dir: Path) -> Callable[..., VllmServer]:
    def get(role: str = "hybrid", *, instance: int = 0, extra_args: tuple[str, ...] = ()) -> VllmServer:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        kv_dir = vllm_kv_dir if role in ("prefill", "decode") else None
        spec = ServerSpec(role=role, instance=instance, kv_dir=kv_dir, extra_args=tuple(extra_args))
        return vllm_fleet.get(spec)[0]

    return get


@pytest.fixture
def vllm_pair(vllm_fleet: VllmFleet, vllm_kv_dir: Path) -> tuple[VllmServer, VllmServer]:
    """(prefill, decode), started together the first time and reused for the session."""
    prefill, decode = vllm_fleet.get(
        ServerSpec(role="prefill", kv_dir=vllm_kv_dir), ServerSpec(role="decode", kv_dir=vllm_kv_dir)
    )
    return prefill, decode
