"""Usage through real processes: requests through the web process are counted per key, model and
node (tokens, requests, errors, time to first token), rolled up into hourly rows by the same
service beat runs (here ``manage.py rollup_usage``), read back from ``/api/usage/`` and charted on
the dashboard (docs/usage.md)."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from enginesim.testing import run_simulator
from tests.support.procs import PYTHON, REPO_ROOT
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e


def test_requests_are_counted_per_key_model_and_node_and_rolled_up_into_hours(stack) -> None:
    model = "usage-rollup"
    with run_simulator(engine="vllm", served_model_name=model) as sim:
        node = stack.add_live_node(sim.url, [model], engine_type="vllm")
        team = stack.add_key(name="usage-team")
        chat = {"model": model, "messages": [{"role": "user", "content": "count these words"}], "max_tokens": 6}

        def send(body: dict) -> httpx.Response:
            headers = {"Authorization": f"Bearer {team}"}
            return httpx.post(f"{stack.base}/v1/chat/completions", json=body, headers=headers, timeout=30)

        answer = send(chat)
        streamed = send({**chat, "stream": True})  # no usage asked: RouterPanel takes it
        refused = send({**chat, "max_tokens": 10**6})  # over the context: the engine's 400
        expected = answer.json()["usage"]

        def rolled_up() -> list[dict]:
            done = subprocess.run(
                [PYTHON, "manage.py", "rollup_usage"], cwd=REPO_ROOT, env=stack.env, capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr
            params = {"key": "usage-team", "group_by": "key,model,node"}
            rows = stack.api.get("/api/usage/", params=params).json()["results"]
            return rows if rows and rows[0]["requests"] == 3 else []

        rows = wait_until(rolled_up, 10, "the three requests never reached the hourly rows")
        with stack.admin_session() as admin:
            chart = admin.get("/dashboard/usage").json()
    assert streamed.status_code == 200 and b'"usage"' not in streamed.content
    assert refused.status_code == 400
    assert rows == [
        {
            "key_id": rows[0]["key_id"],
            "key_name": "usage-team",
            "model": model,
            "node": node["url"],
            "prompt_tokens": 2 * expected["prompt_tokens"],
            "completion_tokens": 2 * expected["completion_tokens"],
            "total_tokens": 2 * expected["total_tokens"],
            "requests": 3,
            "errors": 1,
            "mean_ttft_ms": rows[0]["mean_ttft_ms"],
        }
    ]
    assert rows[0]["mean_ttft_ms"] is not None  # the stream's
    series = {s["model"]: s["tokens"] for s in chart["series"]}
    assert sum(series[model]) >= 2 * expected["total_tokens"]
