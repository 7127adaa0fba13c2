"""Unmodified engines joining through a control plane's registration URL, end to end: RouterPanel's
web process, the prober (the health checks, which also detect the engine type of a node that did
not listen yet when it registered), and simulated LMDeploy engines started with
``--proxy-url``, which register exactly as ``lmdeploy serve api_server --proxy-url`` does (before
they listen, from their bind address ``0.0.0.0``, with no credentials)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from enginesim.testing import run_simulator
from tests.support.ports import free_port
from tests.support.stack import RouterPanelStack, StackSpec
from tests.support.wait import wait_until

# The web process, and the prober (probing every second) for the health checks.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.stack(StackSpec(prober=True, settings={"ROUTERPANEL_HEALTH_INTERVAL": "1"})),
]

MODEL = "selfreg-model"


@pytest.fixture
def plane(stack: RouterPanelStack, request: pytest.FixtureRequest) -> Iterator[dict]:
    """A direct-registration control plane of the test's own; removed with its nodes afterwards."""
    api = stack.api
    created = api.post("/api/control-planes/", json={"name": request.node.name[:90], "kind": "direct"})
    assert created.status_code == 201, created.text
    yield created.json()
    for node in api.get("/api/nodes/", params={"control_plane": created.json()["id"], "limit": 1000}).json()["results"]:
        api.delete(f"/api/nodes/{node['id']}/")
    api.delete(f"/api/control-planes/{created.json()['id']}/")


def node_at(api: httpx.Client, url: str) -> dict | None:
    return next((n for n in api.get("/api/nodes/", params={"url": url}).json()["results"] if n["url"] == url), None)


def chat(stack: RouterPanelStack) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    return httpx.post(stack.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {stack.key}"})


def lmdeploy(proxy_url: str, role: str, port: int):
    """A simulated LMDeploy api_server bound to 0.0.0.0 that registers with ``proxy_url``."""
    return run_simulator(
        engine="lmdeploy",
        role=role,
        host="0.0.0.0",
        port=port,
        served_model_name=MODEL,
        extra_args=[f"--proxy-url={proxy_url}"],
    )


def test_unmodified_lmdeploy_engines_join_pending_take_no_traffic_and_serve_once_approved(stack, plane) -> None:
    api = stack.api
    assert api.patch(f"/api/control-planes/{plane['id']}/", json={"approval_mode": "manual"}).status_code == 200
    hybrid_port, prefill_port = free_port(), free_port()
    with (
        lmdeploy(plane["registration_url"], "hybrid", hybrid_port) as hybrid,
        lmdeploy(plane["registration_url"], "prefill", prefill_port),
    ):
        hybrid_url, prefill_url = f"http://127.0.0.1:{hybrid_port}", f"http://127.0.0.1:{prefill_port}"
        wait_until(lambda: node_at(api, hybrid_url) and node_at(api, prefill_url), 10, "never registered")
        # The engines registered before they listened: their type comes from the prober's first good probe.
        registered = time.monotonic()
        wait_until(
            lambda: all(node_at(api, url)["engine_type"] == "lmdeploy" for url in (hybrid_url, prefill_url)),
            15,
            "the engine type was never detected",
        )
        print(f"\nengine type detected {time.monotonic() - registered:.2f} s after the registrations")
        hybrid_node, prefill_node = node_at(api, hybrid_url), node_at(api, prefill_url)
        assert (hybrid_node["state"], hybrid_node["role"], hybrid_node["source"]) == ("pending", "hybrid", "engine")
        assert (prefill_node["state"], prefill_node["role"]) == ("pending", "prefill")
        assert hybrid_node["control_plane"] == plane["id"]

        for _ in range(3):
            refused = chat(stack)
            assert refused.status_code == 503, refused.text
        assert hybrid.stats()["requests"]["by_endpoint"].get("/v1/chat/completions", 0) == 0

        approved = api.post(f"/api/nodes/{hybrid_node['id']}/approve/")
        assert approved.status_code == 200 and approved.json()["state"] == "active"
        approved_at = time.monotonic()
        wait_until(lambda: chat(stack).status_code == 200, 5, "not served after the approval")
        print(f"approved node served {time.monotonic() - approved_at:.2f} s after the approval")
        assert hybrid.stats()["requests"]["by_endpoint"]["/v1/chat/completions"] >= 1
        assert node_at(api, prefill_url)["state"] == "pending"  # approval is per node


def test_registrations_outside_the_allowed_networks_or_with_a_wrong_token_store_nothing(stack, plane) -> None:
    api = stack.api
    allowed = {"allowed_networks": ["10.0.0.0/8"]}
    assert api.patch(f"/api/control-planes/{plane['id']}/", json=allowed).status_code == 200
    port = free_port()
    with lmdeploy(plane["registration_url"], "decode", port) as engine:
        wait_until(lambda: httpx.get(engine.url + "/health").status_code == 200, 10, "the engine never came up")
        engine.proc.terminate()
        engine.proc.wait(10)
        output = engine.output()
    assert "Service registration failed: HTTP 403" in output
    assert "is outside the networks control plane" in output
    assert node_at(api, f"http://127.0.0.1:{port}") is None

    body = {"url": f"http://0.0.0.0:{port}", "status": {"models": [MODEL], "role": 3}}
    headers = {"accept": "application/json", "Content-Type": "application/json"}
    wrong = httpx.post(f"{stack.base}/register/rpr-not-a-token/nodes/add", json=body, headers=headers)
    assert (wrong.status_code, wrong.json()) == (404, {"error": "Not found."})
    assert api.get("/api/nodes/", params={"control_plane": plane["id"]}).json()["count"] == 0
