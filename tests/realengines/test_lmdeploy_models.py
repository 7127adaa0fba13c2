"""What RouterPanel sends to LMDeploy engines, validated by LMDeploy's own pydantic models (lmdeploy
0.18.0 from PyPI, in .venv-lmdeploy: ``make lmdeploy-env``), not by a copy of them.

RouterPanel's link code (``proxy.pd.lmdeploy.Links``) and its PD protocol (``LmdeployPd``) talk to
simulated LMDeploy engines; the bodies the engines recorded go through LMDeploy's models, and so do
the simulator's answers. The simulator's own validator is held to the same verdicts as LMDeploy's on
good and broken bodies, so its strictness is LMDeploy's.
"""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from enginesim.flavours.lmdeploy_models import MODELS
from enginesim.schema import Invalid, validate
from enginesim.testing import Simulator, run_simulator
from proxy.pd import lmdeploy as wire
from proxy.pd.core import Leg, LegAnswer, PdRequest
from proxy.pd.engines import LmdeployPd
from proxy.snapshot import NodeView, PolicyView, Target
from proxy.upstream import close_session

pytestmark = pytest.mark.real_engine

VALIDATOR = Path(__file__).resolve().parent / "lmdeploy_models.py"


def lmdeploy_validate(python: Path, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LMDeploy's verdict on each ``{"model", "body"|"json"}``."""
    done = subprocess.run(
        [str(python), str(VALIDATOR)], input=json.dumps(items), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Simulator, Simulator]]:
    common = {"engine": "lmdeploy", "extra_args": ["--cache-session-id", "--tp-size=2"]}
    with run_simulator(role="prefill", **common) as prefill, run_simulator(role="decode", **common) as decode:
        yield prefill, decode


def test_the_installed_package_is_lmdeploy_0_18(lmdeploy_python):
    done = subprocess.run([str(lmdeploy_python), str(VALIDATOR), "--version"], capture_output=True, text=True)
    assert done.stdout.strip() == "0.18.0"


def leg(url: str, role: str) -> Leg:
    node = NodeView(id=hash(url) % 10_000, url=url, engine_type="lmdeploy", role=role, state="active", health="healthy")
    return Leg(role, Target(node, "sim-model"))


def fake_pd(payload: dict[str, Any]) -> SimpleNamespace:
    """The parts of a ``PdRequest`` the link and the protocol use, with RouterPanel's own HTTP call."""

    def payload_for(target: Leg, *, drop: tuple[str, ...] = (), **changes: Any) -> dict[str, Any]:
        body = {k: v for k, v in payload.items() if k not in drop}
        return {**body, "model": target.target.served_name, **changes}

    pd = SimpleNamespace(
        policy=PolicyView(),
        prefill_timeout=10.0,
        decode_completed=False,
        request=SimpleNamespace(path="/v1/chat/completions", payload=payload, request_id="rid"),
        payload_for=payload_for,
    )
    pd.call_json = lambda *args, **kwargs: PdRequest.call_json(pd, *args, **kwargs)
    return pd


async def routerpanel_pd(prefill: Simulator, decode: Simulator) -> None:
    """RouterPanel's LMDeploy steps against the two engines: link, prefill, decode, a free_cache."""
    protocol = LmdeployPd()
    p, d = leg(prefill.url, "prefill"), leg(decode.url, "decode")
    pd = fake_pd({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    try:
        await protocol.links.ensure(pd, p, d)
        path, body, _ = protocol.prefill_request(pd, p)
        answer = await pd.call_json(p, "POST", path, body, 10.0)
        assert answer.status == 200, answer.body
        handoff = protocol.handoff(pd, LegAnswer.parse(p, answer.status, answer.body, "application/json"))
        path, body, _ = protocol.decode_request(pd, d, handoff)
        decoded = await pd.call_json(d, "POST", path, body, 10.0)
        assert decoded.status == 200, decoded.body
        await pd.call_json(p, "POST", "/distserve/free_cache", dict(wire.cache_free_request(p.url, 10**6)), 10.0)
    finally:
        await close_session()


def recorded(sim: Simulator, path: str) -> list[dict[str, Any]]:
    return [r["body"] for r in sim.requests() if r["path"] == path]


def test_routerpanels_bodies_are_valid_for_lmdeploys_models_and_survive_them_unchanged(lmdeploy_python, pair):
    prefill, decode = pair
    for sim in pair:
        sim.reset()
    asyncio.run(routerpanel_pd(prefill, decode))
    sent: list[tuple[str, dict[str, Any]]] = []
    for sim in pair:
        sent += [("DistServeInitRequest", b) for b in recorded(sim, "/distserve/p2p_initialize")]
        sent += [("DistServeConnectionRequest", b) for b in recorded(sim, "/distserve/p2p_connect")]
    sent += [("MigrationRequest", recorded(decode, "/v1/chat/completions")[-1]["migration_request"])]
    sent += [("DistServeCacheFreeRequest", b) for b in recorded(prefill, "/distserve/free_cache")]
    assert [m for m, _ in sent].count("DistServeInitRequest") == 2 and len(sent) == 6
    verdicts = lmdeploy_validate(lmdeploy_python, [{"model": m, "body": b} for m, b in sent])
    for (model, body), verdict in zip(sent, verdicts, strict=True):
        assert verdict["ok"], (model, body, verdict)
        # Nothing was coerced on the way in: every field RouterPanel sent is what LMDeploy reads.
        assert {k: verdict["dump"][k] for k in body} == body, model


def test_the_simulators_answers_are_valid_for_lmdeploys_models(lmdeploy_python, pair):
    prefill, decode = pair
    info = httpx.get(prefill.url + "/distserve/engine_info", timeout=5)
    config = json.loads(info.json())
    init = {
        "local_engine_id": prefill.url,
        "local_engine_config": config,
        "remote_engine_id": decode.url,
        "remote_engine_config": config,
        "protocol": 2,
    }
    answer = httpx.post(prefill.url + "/distserve/p2p_initialize", json=init, timeout=5).json()
    items = [
        {"model": "DistServeEngineConfig", "json": info.json()},  # the proxy parses the string's JSON
        {"model": "DistServeInitResponse", "body": answer},
        {"model": "DistServeConnectionResponse", "body": {"status": 1}},
    ]
    verdicts = lmdeploy_validate(lmdeploy_python, items)
    assert all(v["ok"] for v in verdicts), verdicts
    assert len(verdicts[1]["dump"]["kvtransfer_endpoint_info"]) == 2  # one per TP rank


def broken_variants(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The body with one field missing, and with fields of the wrong type or encoding."""
    for key in body:
        yield {k: v for k, v in body.items() if k != key}
    for key, value in body.items():
        if isinstance(value, bool):
            yield {**body, key: "maybe"}
        elif isinstance(value, int):
            yield {**body, key: "x"}
            yield {**body, key: 1.5}
            yield {**body, key: str(value)}  # lax: a numeric string is an int, but not an enum value
        elif isinstance(value, str):
            yield {**body, key: 5}
        elif isinstance(value, list):
            yield {**body, key: ["x"]}
            yield {**body, key: "not a list"}
        elif isinstance(value, dict):
            for inner in broken_variants(value):
                yield {**body, key: inner}
        elif value is None:
            yield {**body, key: "x"}


def test_the_simulator_and_lmdeploy_agree_on_what_is_valid(lmdeploy_python, pair):
    prefill, decode = pair
    config = json.loads(httpx.get(prefill.url + "/distserve/engine_info", timeout=5).json())
    endpoint = {"protocol": 2, "endpoint_info": "{}", "cache_pools": None}
    good = {
        "DistServeEngineConfig": config,
        "DistServeInitRequest": dict(wire.init_request(prefill.url, config, decode.url, config)),
        "DistServeConnectionRequest": {
            "protocol": 2,
            "remote_engine_id": decode.url,
            "remote_engine_endpoint_info": {"zmq_address": "tcp://127.0.0.1:1"},
            "remote_kvtransfer_endpoint_info": [endpoint],
        },
        "MigrationRequest": dict(wire.migration_request(prefill.url, -1, [1, 2], 7)),
        "DistServeCacheFreeRequest": dict(wire.cache_free_request(prefill.url, 3)),
        "DistServeDropConnectionRequest": {"engine_id": prefill.url, "remote_engine_id": decode.url},
    }
    cases = [(m, b) for m, body in good.items() for b in [body, *broken_variants(copy.deepcopy(body))]]
    cases += [("MigrationRequest", {**good["MigrationRequest"], "protocol": "RDMA"})]
    assert len(cases) > 100
    verdicts = lmdeploy_validate(lmdeploy_python, [{"model": m, "body": b} for m, b in cases])
    disagreements = []
    for (model, body), verdict in zip(cases, verdicts, strict=True):
        try:
            validate(MODELS[model], body)
            ours = True
        except Invalid:
            ours = False
        if ours != verdict["ok"]:
            disagreements.append((model, body, verdict))
    assert not disagreements, disagreements[:5]
