"""Request explanations through real processes: the summary header a client asks for, and the
record the web worker flushed to Redis, read back at ``/api/requests/``."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from enginesim.testing import run_simulator
from tests.support.ports import closed_port
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

MODEL = "explain-model"


def chat(stack, request_id: str, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    headers = {"Authorization": f"Bearer {stack.key}", "X-Request-Id": request_id, "x-routerpanel-explain": "1"}
    return httpx.post(stack.v1 + "/chat/completions", json=body, headers=headers, timeout=30)


def explained(stack, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The request's record once its web worker flushed it (about once a second)."""

    def record() -> dict[str, Any] | None:
        response = stack.api.get(f"/api/requests/{request_id}/")
        assert response.status_code in (200, 404), response.text
        return response.json() if response.status_code == 200 else None

    return wait_until(record, timeout, f"{request_id} was never explained", interval=0.1)


def test_a_request_explains_its_pick_its_retry_and_the_nodes_left_out(stack) -> None:
    with run_simulator(served_model_name=MODEL) as sim, run_simulator(served_model_name=MODEL) as doomed:
        good = stack.add_node(sim.url, [MODEL], engine_type="openai", settle=False)
        # Probed healthy when it is added (a node never probed takes no traffic), then gone: this
        # stack runs no prober, so it stays in rotation and a request meets a refused connection.
        dead = stack.add_node(doomed.url, [MODEL], engine_type="openai", settle=False)
        draining = stack.add_node(f"http://127.0.0.1:{closed_port(1)}", [MODEL], engine_type="openai", settle=False)
        assert stack.api.post(f"/api/nodes/{draining['id']}/drain/").status_code == 200
        stack.settle()
        dead_url = doomed.url
        doomed.proc.kill()
        doomed.proc.wait()
        retried = None
        for _ in range(3):  # round robin: one of the first requests meets the dead node first
            request_id = f"e2e-{uuid.uuid4().hex}"
            response = chat(stack, request_id)
            assert response.status_code == 200, response.text
            summary = response.headers["x-routerpanel-explain"]
            assert summary.startswith(f"strategy=round_robin; pick={sim.url}; candidates=")
            assert "draining:1" in summary
            if "retries=1 (engine_unreachable)" in summary:
                retried = request_id
                break
        assert retried is not None, "no request met the dead node first"
        record = explained(stack, retried)
        assert (record["model"], record["key"], record["status"], record["retries"]) == (MODEL, "demo", 200, 1)
        assert (record["mode"], record["strategy"]) == ("hybrid", "round_robin")
        first, second = record["choices"]
        assert first["pick"] == {"node": dead["id"], "url": dead_url}
        assert {e["reason"]: e["count"] for e in first["excluded"]} == {"draining": 1}
        assert {e["reason"] for e in second["excluded"]} == {"draining", "tried"}
        assert [(a["url"], a["status"], a["error"], a["retry"]) for a in record["attempts"]] == [
            (dead_url, 0, "engine_unreachable", None),
            (sim.url, 200, None, "engine_unreachable"),
        ]
        assert record["node"] == {"node": good["id"], "url": sim.url}
        assert record["usage"] is not None and record["usage"]["completion_tokens"] == 4
        assert 0 < record["ttfb_ms"] <= record["total_ms"]


def test_a_stream_keeps_the_usage_the_client_asked_for_and_the_list_filters(stack) -> None:
    with run_simulator(served_model_name=MODEL) as sim:
        node = stack.add_live_node(sim.url, [MODEL], engine_type="openai")
        request_id = f"e2e-stream-{uuid.uuid4().hex}"
        body = {"stream": True, "stream_options": {"include_usage": True}}
        response = chat(stack, request_id, **body)
        assert response.status_code == 200
        assert response.headers["x-routerpanel-explain"] == (
            f"strategy=round_robin; pick={sim.url}; candidates=1; excluded=none; retries=0"
        )
        events = [line for line in response.text.split("\n\n") if line.startswith("data: {")]
        assert json.loads(events[-1][6:])["usage"]["completion_tokens"] == 4  # untouched for the client
        record = explained(stack, request_id)
        assert record["stream"] and record["usage"]["completion_tokens"] == 4
        assert record["attempts"][0]["ttft_ms"] is not None and record["ttfb_ms"] <= record["total_ms"]

        refused = f"e2e-unknown-{uuid.uuid4().hex}"
        headers = {"Authorization": f"Bearer {stack.key}", "X-Request-Id": refused, "x-routerpanel-explain": "1"}
        missing = httpx.post(stack.v1 + "/completions", json={"model": "nope", "prompt": "x"}, headers=headers)
        assert missing.status_code == 404
        assert (
            missing.headers["x-routerpanel-explain"] == "strategy=-; pick=none; candidates=0; excluded=none; retries=0"
        )
        unknown = explained(stack, refused)
        assert (unknown["model"], unknown["status"], unknown["error"]) == ("nope", 404, "model_not_found")
        page = stack.api.get("/api/requests/", params={"model": MODEL, "node": node["id"], "limit": 5}).json()
        assert request_id in [r["id"] for r in page["results"]]
        assert all(r["model"] == MODEL for r in page["results"])
        errors = stack.api.get("/api/requests/", params={"status": "error", "limit": 500}).json()["results"]
        assert refused in [r["id"] for r in errors] and request_id not in [r["id"] for r in errors]


def test_the_api_needs_a_login(stack) -> None:
    assert httpx.get(stack.base + "/api/requests/").status_code == 401
