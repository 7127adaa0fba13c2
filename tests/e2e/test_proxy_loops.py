"""RouterPanel refuses to proxy to itself (proxy/loops.py): a node registered with RouterPanel's own
URL answers ``508 Loop Detected`` in the OpenAI error shape at once, instead of the request going
round until the client gives up; requests to real engines carry the hop marker."""

from __future__ import annotations

import httpx
import pytest

from enginesim.testing import run_simulator

pytestmark = pytest.mark.e2e


def chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_node_that_is_routerpanel_itself_gets_508_loop_detected(stack, stream: bool) -> None:
    stack.add_node(stack.base, ["loop-model"], engine_type="openai")
    auth = {"Authorization": f"Bearer {stack.key}"}
    response = httpx.post(
        stack.v1 + "/chat/completions", json=chat("loop-model", stream=stream), headers=auth, timeout=30
    )
    assert response.status_code == 508, response.text
    error = response.json()["error"]
    assert error["code"] == "loop_detected", error
    assert {"message", "type", "code"} <= set(error)
    assert response.elapsed.total_seconds() < 5


def test_requests_to_a_node_carry_the_hop_marker_and_a_foreign_one_is_kept(stack) -> None:
    with run_simulator(served_model_name="hop-model") as engine:
        stack.add_live_node(engine.url, ["hop-model"], engine_type="openai")
        auth = {"Authorization": f"Bearer {stack.key}"}
        plain = httpx.post(stack.v1 + "/chat/completions", json=chat("hop-model"), headers=auth, timeout=30)
        relayed = httpx.post(
            stack.v1 + "/chat/completions",
            json=chat("hop-model"),
            headers={**auth, "X-RouterPanel-Hop": "another-deployment"},
            timeout=30,
        )
        assert (plain.status_code, relayed.status_code) == (200, 200)
        first, second = (r["headers"] for r in engine.requests()[-2:])
    ours = first["x-routerpanel-hop"]
    assert ours and "," not in ours
    assert second["x-routerpanel-hop"] == f"another-deployment, {ours}"
    again = httpx.post(
        stack.v1 + "/chat/completions", json=chat("hop-model"), headers={**auth, "X-RouterPanel-Hop": f"x, {ours}"}
    )
    assert again.status_code == 508
