"""LMDeploy PD by migration.

Prefill (role ``prefill``, ``with_cache: true``): answer normally (the router asks for one token) and
add ``cache_block_ids`` and ``remote_token_ids`` (prompt ids then the generated token); the response
``id`` is the session id. With ``preserve_cache: true`` the blocks stay held until
``POST /distserve/free_cache {"session_id": N}``.

Decode (role ``decode``): requires ``migration_request {remote_engine_id, remote_session_id,
remote_block_ids, remote_token_id[, protocol]}``. When ``remote_engine_id`` is the prefill's URL (as
LMDeploy's proxy sends it), the decode checks the session with the prefill (``POST
/sim/lmdeploy/migrate``) and fails with 500 if the prefill does not hold it.

``/distserve/p2p_initialize`` and ``/distserve/p2p_connect`` (the connection handshake LMDeploy's proxy
makes once per pair) answer success and are counted.
"""

from __future__ import annotations

from typing import Any, TypeGuard

from enginesim.config import SimConfig
from enginesim.flavours.base import Flavour, blocks_for
from enginesim.http import Request, Response
from enginesim.inference import Handler, InferenceRequest, parse_json
from enginesim.kv import KvLedger
from enginesim.openai import HttpError, Plan
from enginesim.peer import PeerUnreachable, post_json
from enginesim.stats import RequestStats
from enginesim.textgen import count_prompt_tokens, prompt_token_ids


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class LmdeployFlavour(Flavour):
    def __init__(self, config: SimConfig, kv: KvLedger, counters: RequestStats) -> None:
        super().__init__(config, kv, counters)
        self.next_session_id = 1
        self.reset()

    def reset(self) -> None:
        self.handshakes: dict[str, int] = {"p2p_initialize": 0, "p2p_connect": 0}
        self.migrations_in = 0
        self.migration_failures = 0

    def routes(self) -> dict[tuple[str, str], Handler]:
        return {
            ("POST", "/distserve/free_cache"): self.free_cache,
            ("POST", "/distserve/p2p_initialize"): self._handshake("p2p_initialize"),
            ("POST", "/distserve/p2p_connect"): self._handshake("p2p_connect"),
        }

    def admin_routes(self) -> dict[tuple[str, str], Handler]:
        return {("POST", "/sim/lmdeploy/migrate"): self.migrate}

    def stats(self) -> dict[str, Any]:
        return {
            "handshakes": dict(self.handshakes),
            "migrations_in": self.migrations_in,
            "migration_failures": self.migration_failures,
        }

    async def plan(self, req: InferenceRequest) -> Plan:
        if self.config.role == "prefill" and req.body.get("with_cache"):
            return self._prefill(req)
        if self.config.role == "decode":
            return await self._decode(req)
        return self.hybrid_plan(req)

    def _prefill(self, req: InferenceRequest) -> Plan:
        if len(req.prompts) != 1 or req.n != 1:
            raise HttpError(400, "PD prefill takes one prompt and n=1")
        plan = self.hybrid_plan(req)
        session_id = self.next_session_id
        self.next_session_id += 1
        token_ids = prompt_token_ids(req.prompts[0])
        first = plan.choices[0].token_ids[0]
        entry = self.kv.allocate(
            session_id, blocks_for(count_prompt_tokens(req.prompts[0]), self.config.kv_block_size), token=first
        )
        if not req.body.get("preserve_cache"):
            self.kv.free(session_id)
        plan.response_id = str(session_id)
        plan.extra["cache_block_ids"] = entry.blocks
        plan.extra["remote_token_ids"] = [*token_ids, first]
        plan.cacheable = False
        plan.kv_key = session_id if req.body.get("preserve_cache") else None
        return plan

    async def _decode(self, req: InferenceRequest) -> Plan:
        mr = req.body.get("migration_request")
        if (
            not isinstance(mr, dict)
            or not _is_int(mr.get("remote_session_id"))
            or not _is_int(mr.get("remote_token_id"))
            or not isinstance(mr.get("remote_block_ids"), list)
            or not all(_is_int(b) for b in mr["remote_block_ids"])
        ):
            self.migration_failures += 1
            raise HttpError(400, "decode needs a migration_request built from the prefill's answer")
        engine = mr.get("remote_engine_id")
        if isinstance(engine, str) and engine.startswith(("http://", "https://")):
            check = {
                "session_id": mr["remote_session_id"],
                "block_ids": mr["remote_block_ids"],
                "token_id": mr["remote_token_id"],
            }
            try:
                status, answer = await post_json(
                    engine.rstrip("/") + "/sim/lmdeploy/migrate", check, timeout=self.config.pd_timeout_s
                )
            except PeerUnreachable as exc:
                status, answer = 0, str(exc)
            if status != 200:
                self.migration_failures += 1
                raise HttpError(500, f"migration failed: {answer}", type="server_error")
        self.migrations_in += 1
        plan = self.hybrid_plan(req)
        plan.cacheable = False
        return plan

    async def migrate(self, request: Request, response: Response) -> None:
        body = parse_json(request)
        entry = self.kv.get(body.get("session_id")) if isinstance(body, dict) else None
        if entry is None:
            raise HttpError(404, "no preserved cache for that session")
        if body.get("block_ids") != entry.blocks or body.get("token_id") != entry.meta.get("token"):
            raise HttpError(409, "block ids or token id do not match the session")
        entry.meta["migrated"] = True
        response.send_json(200, {"session_id": entry.key, "blocks": entry.blocks})

    async def free_cache(self, request: Request, response: Response) -> None:
        body = parse_json(request)
        session_id = body.get("session_id") if isinstance(body, dict) else None
        if not _is_int(session_id):
            raise HttpError(400, 'body must be {"session_id": int}')
        freed = self.kv.free(session_id)
        self.counters.by_status["200"] += 1
        response.send_json(200, {"session_id": session_id, "freed": freed})

    def _handshake(self, name: str) -> Handler:
        async def handler(request: Request, response: Response) -> None:
            self.handshakes[name] += 1
            response.send_json(200, {"status": "ok"})

        return handler
