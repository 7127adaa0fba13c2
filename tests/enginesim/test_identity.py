"""What each flavour says about itself, as the real engine does: ``owned_by`` in ``/v1/models`` and
the endpoints that only that engine has (RouterPanel detects the engine type from them)."""

from __future__ import annotations

import json

import httpx
import pytest

from enginesim.testing import run_simulator


@pytest.mark.parametrize(
    ("engine", "owned_by"),
    [
        ("vllm", "vllm"),
        ("sglang", "sglang"),
        ("lmdeploy", "lmdeploy"),
        ("nanodeploy", "dlengine"),
        ("dlengine", "dlengine"),
        ("openai", "openai"),
    ],
)
def test_models_are_owned_by_the_engine_as_it_says_it(engine: str, owned_by: str) -> None:
    with run_simulator(engine=engine) as sim:
        [model] = httpx.get(sim.url + "/v1/models", timeout=5).json()["data"]
    assert (model["id"], model["owned_by"]) == ("sim-model", owned_by)


def test_vllm_answers_its_version() -> None:
    with run_simulator(engine="vllm") as sim:
        assert httpx.get(sim.url + "/version", timeout=5).json() == {"version": "0.32.0"}
        assert httpx.get(sim.url + "/server_info", timeout=5).status_code == 404  # as vLLM 0.32 outside dev mode


def test_sglang_answers_its_server_info_under_both_names() -> None:
    with run_simulator(engine="sglang", role="decode") as sim:
        for path in ("/server_info", "/get_server_info"):
            info = httpx.get(sim.url + path, timeout=5).json()
            assert (info["model_path"], info["disaggregation_mode"], info["version"]) == (
                "/models/sim-model",
                "decode",
                "0.5.23",
            )


def test_lmdeploy_answers_its_engine_info_as_a_json_string() -> None:
    with run_simulator(engine="lmdeploy", role="prefill") as sim:
        body = httpx.get(sim.url + "/distserve/engine_info", timeout=5).json()
    assert isinstance(body, str)
    config = json.loads(body)
    assert set(config) == {
        "tp_size",
        "ep_size",
        "dp_size",
        "pp_size",
        "dp_rank",
        "block_size",
        "num_cpu_blocks",
        "num_gpu_blocks",
    }


def test_nanodeploy_has_pd_free_for_post_only() -> None:
    with run_simulator(engine="nanodeploy") as sim:
        assert httpx.get(sim.url + "/pd/free", timeout=5).status_code == 405
