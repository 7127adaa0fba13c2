"""Helpers shared by the PD end-to-end suites: requests through RouterPanel, SSE parsing, the
engines' KV ledgers and RouterPanel's own counters."""

from __future__ import annotations

import json
from typing import Any

import httpx

from enginesim import chat_prompt_text, expected_completion
from tests.support.wait import wait_until


def chat(model: str, content: str = "Tell me about prefill", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def completion(model: str, prompt: str = "Once upon a time in a data centre", **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, **extra}


def path_of(body: dict[str, Any]) -> str:
    return "/chat/completions" if "messages" in body else "/completions"


def expected_text(body: dict[str, Any]) -> str:
    prompt = chat_prompt_text(body["messages"]) if "messages" in body else body["prompt"]
    return expected_completion(prompt, body.get("max_tokens"))


def post(stack, body: dict[str, Any], *, timeout: float = 30.0, headers: dict[str, str] | None = None):
    auth = {"Authorization": f"Bearer {stack.key}", **(headers or {})}
    return httpx.post(stack.v1 + path_of(body), json=body, headers=auth, timeout=timeout)


def events(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body: parsed JSON, or the raw string (``[DONE]``)."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def streamed_text(parsed: list[Any]) -> str:
    pieces = []
    for event in parsed:
        if not isinstance(event, dict):
            continue
        for choice in event.get("choices") or []:
            delta = choice.get("delta")
            pieces.append((delta or {}).get("content") or "" if delta is not None else choice.get("text") or "")
    return "".join(pieces)


def answer_text(data: dict[str, Any]) -> str:
    choice = data["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def kv(sim) -> dict[str, Any]:
    return sim.stats()["kv"]


def wait_kv_settled(prefills, *, timeout: float = 15.0) -> list[dict[str, Any]]:
    """Wait until every prefill engine holds no KV; return their ledgers."""

    ledgers: list[dict[str, Any]] = []

    def settled() -> list[dict[str, Any]] | None:
        ledgers[:] = [kv(sim) for sim in prefills]
        return ledgers if all(ledger["outstanding_count"] == 0 for ledger in ledgers) else None

    return wait_until(settled, timeout, lambda: f"KV still held: {ledgers}")


def metric_values(stack, name: str) -> dict[str, float]:
    """Every sample of metric ``name`` on RouterPanel's ``/metrics``: ``{labels: value}``."""
    values: dict[str, float] = {}
    for line in httpx.get(stack.base + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key[len(name) :]] = float(value)
    return values


def wait_router_idle(stack, *, timeout: float = 15.0) -> dict[str, float]:
    """Wait until RouterPanel has no request in flight on any node, no PD request and no pending
    clean-up; return the figures."""

    figures: dict[str, float] = {}

    def idle() -> dict[str, float] | None:
        inflight = metric_values(stack, "routerpanel_proxy_inflight")
        figures["node_inflight"] = sum(v for k, v in inflight.items() if k.startswith("{"))
        figures["pd_inflight"] = sum(metric_values(stack, "routerpanel_proxy_pd_inflight").values())
        figures["pd_cleanups_pending"] = sum(metric_values(stack, "routerpanel_proxy_pd_cleanups_pending").values())
        return None if any(figures.values()) else dict(figures)

    return wait_until(idle, timeout, lambda: f"RouterPanel still busy: {figures}")
