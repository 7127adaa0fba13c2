"""NanoDeploy / DLEngine ``serve``: two-stage PD with a serialised sequence migrated from prefill to decode.

Prefill (role ``prefill``, request ``kv_transfer_params.do_remote_decode``): compute the first token,
keep the sequence's KV blocks, answer an empty completion with ``kv_transfer_params {migration, seq_id,
first_token}``. The blocks stay held until ``POST /pd/free {"seq_ids": [...]}``. When the first token is
EOS (prompt marker ``[[eos]]``, ``--eos-at-prefill-prob``, or a budget of one token) the prefill answers
the full completion and holds nothing.

Decode (role ``decode``): requires ``kv_transfer_params.migration`` + ``seq_id``; generates the whole
answer starting with ``first_token`` (so the client sees what a hybrid engine would say).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import random
from typing import Any

from enginesim.config import SimConfig
from enginesim.flavours.base import Flavour, blocks_for
from enginesim.http import Request, Response
from enginesim.inference import Handler, InferenceRequest, parse_json
from enginesim.kv import KvLedger
from enginesim.openai import ChoicePlan, HttpError, Plan
from enginesim.stats import RequestStats
from enginesim.textgen import (
    count_prompt_tokens,
    natural_length,
    plan_tokens_from_seed,
    prompt_seed,
    prompt_token_ids,
)

FIRST_SEQ_ID = 1024


def _checksum(payload: dict[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in payload.items() if k != "checksum"}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_migration(payload: dict[str, Any]) -> str:
    """Base64 of the serialised sequence, with a checksum so corruption is detected."""
    payload = {**payload, "checksum": _checksum(payload)}
    return base64.b64encode(json.dumps(payload, sort_keys=True).encode()).decode()


def decode_migration(migration: Any) -> dict[str, Any]:
    """The sequence inside a migration string; ``ValueError`` when missing or corrupt."""
    if not isinstance(migration, str) or not migration:
        raise ValueError("migration missing")
    try:
        payload = json.loads(base64.b64decode(migration, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"migration is not base64 JSON: {exc}") from None
    if not isinstance(payload, dict) or payload.get("checksum") != _checksum(payload):
        raise ValueError("migration checksum mismatch")
    return payload


class NanoDeployFlavour(Flavour):
    def __init__(self, config: SimConfig, kv: KvLedger, counters: RequestStats) -> None:
        super().__init__(config, kv, counters)
        self.reset()

    def reset(self) -> None:
        self.next_seq_id = FIRST_SEQ_ID
        self.migrations_out = 0
        self.migrations_in = 0
        self.eos_at_prefill = 0
        self.rejected_migrations = 0

    def routes(self) -> dict[tuple[str, str], Handler]:
        return {("POST", "/pd/free"): self.pd_free}

    def stats(self) -> dict[str, Any]:
        return {
            "next_seq_id": self.next_seq_id,
            "migrations_out": self.migrations_out,
            "migrations_in": self.migrations_in,
            "eos_at_prefill": self.eos_at_prefill,
            "rejected_migrations": self.rejected_migrations,
        }

    async def plan(self, req: InferenceRequest) -> Plan:
        params = req.body.get("kv_transfer_params")
        if self.config.role == "prefill" and isinstance(params, dict) and params.get("do_remote_decode"):
            return self._prefill(req)
        if self.config.role == "decode":
            return self._decode(req, params)
        return self.hybrid_plan(req)

    def _prefill(self, req: InferenceRequest) -> Plan:
        if len(req.prompts) != 1 or req.n != 1:
            raise HttpError(400, "PD prefill takes one prompt and n=1", code="invalid_request")
        prompt = req.prompts[0]
        seed = prompt_seed(prompt)
        natural = natural_length(prompt, seed, self.config.natural_tokens)
        ids, finish = plan_tokens_from_seed(seed, natural, req.max_tokens)
        prompt_tokens = count_prompt_tokens(prompt)
        forced_eos = self.config.eos_at_prefill_prob > 0 and random.random() < self.config.eos_at_prefill_prob
        if len(ids) <= 1 or forced_eos:
            # The first token ends the sequence: the prefill answers in full and keeps no KV.
            self.eos_at_prefill += 1
            choice = ChoicePlan(0, ids[:1], "stop" if forced_eos else finish)
            return Plan(req.kind, req.model, [choice], prompt_tokens, force_non_stream=True, cacheable=False)
        seq_id = self.next_seq_id
        self.next_seq_id += 1
        token_ids = prompt_token_ids(prompt)
        entry = self.kv.allocate(seq_id, blocks_for(len(token_ids), self.config.kv_block_size))
        migration = encode_migration(
            {
                "version": 1,
                "seq_id": seq_id,
                "prompt_token_ids": token_ids,
                "prompt_seed": seed.hex(),
                "natural_length": natural,
                "max_tokens": req.max_tokens,
                "remaining_tokens": None if req.max_tokens is None else req.max_tokens - 1,
                "first_token": ids[0],
                "block_ids": entry.blocks,
                "source": f"{self.config.host}:{self.config.port}",
            }
        )
        self.migrations_out += 1
        params = {"migration": migration, "seq_id": seq_id, "first_token": ids[0]}
        empty = ChoicePlan(0, [], None)  # type: ignore[arg-type]
        return Plan(
            req.kind,
            req.model,
            [empty],
            prompt_tokens,
            extra={"kv_transfer_params": params},
            force_non_stream=True,
            cacheable=False,
            kv_key=seq_id,
        )

    def _decode(self, req: InferenceRequest, params: Any) -> Plan:
        try:
            if not isinstance(params, dict) or "seq_id" not in params:
                raise ValueError("kv_transfer_params.migration and seq_id are required")
            payload = decode_migration(params.get("migration"))
            if payload.get("seq_id") != params["seq_id"]:
                raise ValueError("seq_id does not match the migration")
            if "first_token" in params and params["first_token"] != payload.get("first_token"):
                raise ValueError("first_token does not match the migration")
            seed = bytes.fromhex(payload["prompt_seed"])
            if len(req.prompts) != 1 or prompt_seed(req.prompts[0]) != seed:
                raise ValueError("the request's prompt is not the migrated sequence's")
        except (ValueError, KeyError, TypeError) as exc:
            self.rejected_migrations += 1
            raise HttpError(400, f"invalid migration payload: {exc}", code="invalid_migration") from None
        ids, finish = plan_tokens_from_seed(seed, int(payload["natural_length"]), payload.get("max_tokens"))
        self.migrations_in += 1
        prompt_tokens = len(payload.get("prompt_token_ids") or []) or 1
        choices = [ChoicePlan(k, ids, finish) for k in range(req.n)]
        return Plan(req.kind, req.model, choices, prompt_tokens, cacheable=False)

    async def pd_free(self, request: Request, response: Response) -> None:
        body = parse_json(request)
        seq_ids = body.get("seq_ids") if isinstance(body, dict) else None
        if not isinstance(seq_ids, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seq_ids):
            raise HttpError(400, 'body must be {"seq_ids": [int, ...]}', code="invalid_request")
        freed = [s for s in seq_ids if self.kv.free(s)]
        self.counters.by_status["200"] += 1
        response.send_json(200, {"freed": freed})
