"""NanoDeploy / DLEngine ``serve``: two-stage PD with a serialised sequence migrated from prefill to decode,
as DLEngine's OpenAI server does it (no schema validation: only what it checks by hand is a 400).

Prefill (role ``prefill``, request ``kv_transfer_params.do_remote_decode``): compute the first token of
the first prompt (``n`` is ignored), keep the sequence's KV blocks, answer an empty completion
(``finish_reason: "length"``, no completion tokens) with ``kv_transfer_params {migration, seq_id,
first_token}``. The blocks stay held until ``POST /pd/free {"seq_ids": [...]}``, which queues the release
and echoes the ids it was given (``int()`` of each), whether they were held or not; the KV ledger still
counts double and unknown frees for tests. When the first token is EOS (prompt marker ``[[eos]]``,
``--eos-at-prefill-prob``, or a budget of one token) the prefill answers the full completion and holds
nothing.

Decode (role ``decode``): requires ``kv_transfer_params.migration`` (the simulator's own 400 when it
is missing) and a positive ``seq_id`` (else 400 ``invalid migration payload: missing positive seq_id``);
a migration that does not decode is an engine error (500). It continues the migrated sequence (the
prompt of its own request is not compared), starting with ``first_token`` when given (without it the
answer lacks that token, as in DLEngine), capped by the request's ``max_tokens`` (else
``max_completion_tokens``, else 512).
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
from enginesim.inference import Handler, InferenceRequest
from enginesim.kv import KvLedger
from enginesim.openai import ChoicePlan, HttpError, Plan, StreamStyle
from enginesim.stats import RequestStats
from enginesim.textgen import (
    count_prompt_tokens,
    natural_length,
    plan_tokens_from_seed,
    prompt_seed,
    prompt_token_ids,
)

FIRST_SEQ_ID = 1024


# ``json.dumps(obj, sort_keys=True)``, its encoder made once (``json.dumps`` builds one per call).
_SORTED = json.JSONEncoder(sort_keys=True)


def _checksum(payload: dict[str, Any]) -> str:
    canonical = _SORTED.encode({k: v for k, v in payload.items() if k != "checksum"})
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_migration(payload: dict[str, Any]) -> str:
    """Base64 of the serialised sequence, with a checksum so corruption is detected."""
    payload = {**payload, "checksum": _checksum(payload)}
    return base64.b64encode(_SORTED.encode(payload).encode()).decode()


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
    owned_by = "dlengine"  # ``dlengine serve`` lists its model as owned by "dlengine"
    stream_style = StreamStyle(spaced=True)

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
        prompt = req.prompts[0]  # DLEngine takes the first prompt of a list and ignores n
        seed = prompt_seed(prompt)
        natural = natural_length(prompt, seed, self.config.natural_tokens)
        ids, finish = plan_tokens_from_seed(seed, natural, req.max_tokens)
        prompt_tokens = count_prompt_tokens(prompt)
        forced_eos = self.config.eos_at_prefill_prob > 0 and random.random() < self.config.eos_at_prefill_prob
        if len(ids) <= 1 or forced_eos:
            # The first token ends the sequence: the prefill answers in full and keeps no KV.
            self.eos_at_prefill += 1
            choice = ChoicePlan(0, ids[:1], "stop" if forced_eos else finish)
            return Plan(
                req.kind,
                req.model,
                [choice],
                prompt_tokens,
                created=self.config.created,
                force_non_stream=True,
                cacheable=False,
            )
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
        empty = ChoicePlan(0, [], "length")
        return Plan(
            req.kind,
            req.model,
            [empty],
            prompt_tokens,
            extra={"kv_transfer_params": params},
            created=self.config.created,
            force_non_stream=True,
            cacheable=False,
            kv_key=seq_id,
        )

    def _decode(self, req: InferenceRequest, params: Any) -> Plan:
        if not isinstance(params, dict) or not params.get("migration"):
            # What a DLEngine decode does then is not in its source's PD path; the simulator refuses,
            # so a router that forgot the migration fails its tests instead of recomputing unseen.
            self.rejected_migrations += 1
            raise nano_error(400, "invalid migration payload: missing migration", "invalid_request_error")
        try:
            seq_id = int(params.get("seq_id") or 0)
        except (TypeError, ValueError):
            seq_id = 0
        if seq_id <= 0:
            self.rejected_migrations += 1
            raise nano_error(400, "invalid migration payload: missing positive seq_id", "invalid_request_error")
        try:
            payload = decode_migration(params["migration"])
            seed = bytes.fromhex(payload["prompt_seed"])
            ids, finish = plan_tokens_from_seed(seed, int(payload["natural_length"]), payload.get("max_tokens"))
        except (ValueError, KeyError, TypeError) as exc:
            self.rejected_migrations += 1
            raise nano_error(500, f"engine error: {exc}", "engine_error") from None
        if params.get("first_token") is None:
            ids = ids[1:]  # the migrated sequence goes on after its first token, which only the router has
        budget = req.body.get("max_tokens") or req.body.get("max_completion_tokens") or 512
        if isinstance(budget, int) and len(ids) > budget:
            ids, finish = ids[:budget], "length"
        self.migrations_in += 1
        prompt_tokens = len(payload.get("prompt_token_ids") or []) or 1
        return Plan(
            req.kind,
            req.model,
            [ChoicePlan(0, ids, finish)],
            prompt_tokens,
            created=self.config.created,
            cacheable=False,
        )

    async def pd_free(self, request: Request, response: Response) -> None:
        try:
            body = json.loads(request.body)
        except ValueError as exc:
            raise nano_error(400, f"Invalid JSON body: {exc}", "invalid_request_error") from None
        seq_ids = body.get("seq_ids") if isinstance(body, dict) else None
        if not isinstance(seq_ids, list):
            raise nano_error(400, "'seq_ids' must be a list of integers", "invalid_request_error")
        try:
            ids = [int(s) for s in seq_ids]
        except (TypeError, ValueError) as exc:
            raise nano_error(400, f"invalid seq_ids: {exc}", "invalid_request_error") from None
        for seq_id in ids:  # the release is queued: the answer says nothing about what was held
            self.kv.free(seq_id)
        self.counters.by_status["200"] += 1
        response.send_json(200, {"freed": ids})


def nano_error(status: int, message: str, error_type: str) -> HttpError:
    """DLEngine's error body: ``{"error": {"message", "type"}}``."""
    return HttpError(status, message, payload={"error": {"message": message, "type": error_type}})
