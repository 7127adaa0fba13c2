"""Engine adapters, registered by engine type: how a request for a node is addressed upstream.

In hybrid mode every supported engine speaks plain OpenAI, so one adapter serves them all; the
registry is where engine quirks go. The per-engine prefill/decode steps (NanoDeploy migration,
vLLM KV transfer, SGLang bootstrap, LMDeploy migration) live with the PD orchestration in
``proxy.pd.engines``, registered by engine type the same way; the hybrid path does not use them.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodes.choices import EngineType

from .snapshot import Target


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    url: str
    body: bytes
    headers: dict[str, str]


class EngineAdapter:
    """OpenAI-compatible engine: POST the client's body (model rewritten) to the same path."""

    engine_type = EngineType.OPENAI

    def hybrid_request(self, target: Target, path: str, body: bytes, request_id: str) -> UpstreamRequest:
        return UpstreamRequest(
            url=target.node.url + path,
            body=body,
            headers={"Content-Type": "application/json", "X-Request-Id": request_id},
        )


class NanoDeployAdapter(EngineAdapter):
    engine_type = EngineType.NANODEPLOY


class VllmAdapter(EngineAdapter):
    """vLLM balances its data-parallel ranks itself in hybrid mode; PD pins a rank (``proxy.pd``)."""

    engine_type = EngineType.VLLM


class SglangAdapter(EngineAdapter):
    engine_type = EngineType.SGLANG


class LmdeployAdapter(EngineAdapter):
    engine_type = EngineType.LMDEPLOY


ADAPTERS: dict[str, EngineAdapter] = {}


def register(adapter: EngineAdapter) -> EngineAdapter:
    ADAPTERS[adapter.engine_type] = adapter
    return adapter


for _adapter in (EngineAdapter(), NanoDeployAdapter(), VllmAdapter(), SglangAdapter(), LmdeployAdapter()):
    register(_adapter)

_DEFAULT = ADAPTERS[EngineType.OPENAI]


def adapter_for(engine_type: str) -> EngineAdapter:
    return ADAPTERS.get(engine_type, _DEFAULT)
