"""Fixtures for the real-engine tier: real vLLM servers (CPU build) started from .venv-vllm.

- ``vllm_python``: the vLLM virtualenv's interpreter. Without it (``make vllm-env`` not run) the
  tests skip, unless ROUTERPANEL_REQUIRE_REAL_ENGINES is set (CI sets it), when they fail.
- ``vllm_models``: the tiny chat and embedding models, built without a download and cached.
- ``vllm_server(role=..., instance=0, extra_args=())``: a ready server for that spec, started once
  per session and reused; at most two run at a time (the least recently used one is stopped).
- ``vllm_pair``: the session's pair, prefill and decode, both ``kv_both`` with the ExampleConnector
  on one shared directory. Such a server also answers plain requests, so the pair doubles as two
  hybrid servers; tests that want servers without a connector ask ``vllm_server`` for them.
- ``routerpanel``: RouterPanel's web process (uvicorn), the default stack of the session's process-stack
  factory (``stack``, tests/support/stack.py), with a clean registry for each test.
- ``lmdeploy_python``: the LMDeploy virtualenv's interpreter (``make lmdeploy-env``), which runs
  LMDeploy's own models (``lmdeploy_models.py``, ``lmdeploy_stream.py``); skips or fails like
  ``vllm_python``.

The servers are shared by the whole session and at most two run at once, so the modules run in the
order of ``MODULE_ORDER``: the tests on the pair first, the one that kills a server of it last among
them, the embedding server's after.
"""

from __future__ import annotations

import os
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
from tests.support.procs import REPO_ROOT
from tests.support.stack import RouterPanelStack

HERE = Path(__file__).resolve().parent
LMDEPLOY_PYTHON = Path(os.environ.get("ROUTERPANEL_LMDEPLOY_PYTHON", REPO_ROOT / ".venv-lmdeploy" / "bin" / "python"))
MODULE_ORDER = (
    "test_vllm_direct",
    "test_vllm_and_simulator_agree",
    "test_vllm_request_models",
    "test_routerpanel_vllm_surface",
    "test_stream_usage_vllm",
    "test_routerpanel_vllm",  # ends by killing a server of the pair
    "test_vllm_embeddings",
    "test_routerpanel_vllm_embeddings",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run this directory's modules in ``MODULE_ORDER``, each in its own order, in the places its
    items had (so the rest of the session keeps its order)."""
    places = [i for i, item in enumerate(items) if item.path.parent == HERE]

    def rank(item: pytest.Item) -> int:
        stem = item.path.stem
        return MODULE_ORDER.index(stem) if stem in MODULE_ORDER else len(MODULE_ORDER)

    for place, item in zip(places, sorted((items[i] for i in places), key=rank), strict=True):
        items[place] = item


def _interpreter(python: Path, target: str, engine: str) -> Path:
    """``python`` when it exists; otherwise the test skips, or fails when real engines are required."""
    if python.exists():
        return python
    message = f"no {engine} virtualenv at {python}: run `make {target}`"
    if real_engines_required():
        pytest.fail(f"{message} (ROUTERPANEL_REQUIRE_REAL_ENGINES is set)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    return _interpreter(VLLM_PYTHON, "vllm-env", "vLLM")


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


@pytest.fixture
def routerpanel(stack: RouterPanelStack) -> RouterPanelStack:
    """RouterPanel with an empty registry and the default route policy."""
    return stack


@pytest.fixture
def routerpanel_redis(stack: RouterPanelStack) -> str:
    """The Redis database of the tier's RouterPanel (its breakers, counters and configuration version)."""
    return stack.redis_url


@pytest.fixture(scope="module")
def lmdeploy_python() -> Path:
    """The Python of .venv-lmdeploy (``make lmdeploy-env``), which has LMDeploy's models."""
    return _interpreter(LMDEPLOY_PYTHON, "lmdeploy-env", "LMDeploy")
