"""The plain OpenAI engine; other flavours extend it with their PD protocol."""

from __future__ import annotations

from typing import Any

from enginesim.config import SimConfig
from enginesim.http import Request
from enginesim.inference import Handler, InferenceRequest, parse_inference
from enginesim.kv import KvLedger
from enginesim.openai import PLAIN, ChoicePlan, Plan
from enginesim.stats import RequestStats
from enginesim.textgen import count_prompt_tokens, plan_tokens


class Flavour:
    """Hybrid serving only: every request is answered in full.

    A flavour sees what it needs of its engine (the options, the KV ledger, the request counters), not the app.
    """

    # What the engine's ``GET /v1/models`` says in ``owned_by`` (routers detect the engine by it).
    owned_by = "openai"
    # What the engine answers for a path it does not serve (None: an OpenAI-shaped error).
    not_found: dict[str, Any] | None = None
    # How its streams are written, where asking for usage changes them.
    stream_style = PLAIN

    @property
    def generates(self) -> bool:
        """Serves chat and completions (a pooling model does not)."""
        return True

    def __init__(self, config: SimConfig, kv: KvLedger, counters: RequestStats) -> None:
        self.config = config
        self.kv = kv
        self.counters = counters

    def routes(self) -> dict[tuple[str, str], Handler]:
        """Extra engine endpoints (counted in stats like the OpenAI ones)."""
        return {}

    def admin_routes(self) -> dict[tuple[str, str], Handler]:
        """Extra ``/sim/*`` endpoints (simulator plumbing, e.g. the PD side channels)."""
        return {}

    def stats(self) -> dict[str, Any]:
        return {}

    def reset(self) -> None:
        """Forget PD counters (``POST /sim/reset``)."""

    def response_headers(self, req: InferenceRequest) -> list[tuple[str, str]]:
        return []

    def parse(self, request: Request, kind: str) -> InferenceRequest:
        """A chat (``kind="chat"``) or completion request, refused (``HttpError``) as the engine refuses it."""
        return parse_inference(
            request, kind, default_model=self.config.served_model_name, accepted_models=self.config.accepted_model_names
        )

    async def plan(self, req: InferenceRequest) -> Plan:
        return self.hybrid_plan(req)

    def hybrid_plan(
        self, req: InferenceRequest, max_tokens: int | None = None, *, limit: int | None = None, cacheable: bool = True
    ) -> Plan:
        """The full answer: for each prompt, ``n`` copies of its deterministic completion.

        ``limit`` cuts every choice to that many tokens (a prefill leg that stops after its first token).
        ``cacheable=False`` keeps fast mode from answering a repeat from cache (a PD leg has side effects).
        """
        budget = req.max_tokens if max_tokens is None else max_tokens
        choices: list[ChoicePlan] = []
        prompt_tokens = 0
        for j, prompt in enumerate(req.prompts):
            ids, finish = plan_tokens(prompt, budget, self.config.natural_tokens)
            if limit is not None and len(ids) > limit:
                ids, finish = ids[:limit], "length"
            prompt_tokens += count_prompt_tokens(prompt)
            choices.extend(ChoicePlan(j * req.n + k, ids, finish) for k in range(req.n))
        return Plan(
            kind=req.kind,
            model=req.model,
            choices=choices,
            prompt_tokens=prompt_tokens,
            cacheable=cacheable,
            created=self.config.created,
        )


def blocks_for(prompt_tokens: int, block_size: int) -> int:
    """KV blocks a sequence of ``prompt_tokens`` occupies."""
    return max(1, -(-prompt_tokens // max(1, block_size)))
