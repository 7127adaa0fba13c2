"""vLLM with a NIXL-style KV connector (two-stage PD) and data-parallel ranks.

Prefill (role ``prefill``, ``kv_transfer_params.do_remote_decode``): answer normally and return the
``kv_transfer_params`` a NIXL prefill returns (``do_remote_prefill: true, do_remote_decode: false,
remote_engine_id, remote_block_ids, remote_host, remote_port, tp_size``); the blocks stay held under
the request id (``X-Request-Id``) until a decode reads them or ``KV_ABORT_TIMEOUT_S`` passes.

Decode (role ``decode``): requires those params and the same ``X-Request-Id``; it "reads" the blocks
from ``remote_host:remote_port`` (the prefill simulator's side channel ``POST /sim/vllm/kv_read``), and
fails with 500 if the prefill never saw that request id or the blocks differ.

``X-data-parallel-rank`` is counted per rank in ``/sim/stats`` and must be below ``--dp-size``.
"""

from __future__ import annotations

import uuid
from typing import Any

from enginesim.config import SimConfig
from enginesim.flavours.base import Flavour, blocks_for
from enginesim.http import Request, Response
from enginesim.inference import Handler, InferenceRequest, parse_json
from enginesim.kv import KvLedger
from enginesim.openai import HttpError, Plan
from enginesim.peer import PeerUnreachable, post_json
from enginesim.stats import RequestStats
from enginesim.textgen import count_prompt_tokens

KV_ABORT_TIMEOUT_S = 480.0  # vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT default
_REQUIRED = ("remote_engine_id", "remote_block_ids", "remote_host", "remote_port")


class VllmFlavour(Flavour):
    def __init__(self, config: SimConfig, kv: KvLedger, counters: RequestStats) -> None:
        super().__init__(config, kv, counters)
        self.engine_id = str(uuid.uuid4())
        self.reset()

    def reset(self) -> None:
        self.prefills = 0
        self.decodes = 0
        self.transfer_failures = 0

    def admin_routes(self) -> dict[tuple[str, str], Handler]:
        return {("POST", "/sim/vllm/kv_read"): self.kv_read}

    def stats(self) -> dict[str, Any]:
        return {
            "engine_id": self.engine_id,
            "prefills": self.prefills,
            "decodes": self.decodes,
            "transfer_failures": self.transfer_failures,
        }

    def response_headers(self, req: InferenceRequest) -> list[tuple[str, str]]:
        rid = req.header("x-request-id")
        return [("x-request-id", rid)] if rid else []

    async def plan(self, req: InferenceRequest) -> Plan:
        rank = req.header("x-data-parallel-rank")
        if rank is not None and (not rank.isdigit() or int(rank) >= self.config.dp_size):
            raise HttpError(400, f"data parallel rank {rank} out of range (dp size {self.config.dp_size})")
        params = req.body.get("kv_transfer_params")
        if self.config.role == "prefill" and isinstance(params, dict) and params.get("do_remote_decode"):
            return self._prefill(req)
        if self.config.role == "decode":
            return await self._decode(req, params)
        return self.hybrid_plan(req)

    def _prefill(self, req: InferenceRequest) -> Plan:
        self.kv.expire_older_than(KV_ABORT_TIMEOUT_S)
        request_id = req.header("x-request-id") or f"cmpl-{uuid.uuid4().hex}"
        plan = self.hybrid_plan(req)
        tokens = sum(count_prompt_tokens(p) for p in req.prompts)
        entry = self.kv.allocate(request_id, blocks_for(tokens, self.config.kv_block_size))
        self.prefills += 1
        plan.extra["kv_transfer_params"] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_block_ids": entry.blocks,
            "remote_host": self.config.host,
            "remote_port": self.config.port,
            "tp_size": 1,
        }
        plan.cacheable = False
        plan.kv_key = request_id
        return plan

    async def _decode(self, req: InferenceRequest, params: Any) -> Plan:
        if (
            not isinstance(params, dict)
            or not params.get("do_remote_prefill")
            or any(k not in params for k in _REQUIRED)
        ):
            raise HttpError(400, "decode needs the kv_transfer_params a prefill returned", code="invalid_request")
        request_id = req.header("x-request-id")
        if not request_id:
            raise HttpError(400, "decode needs the X-Request-Id the prefill was sent", code="invalid_request")
        url = f"http://{_host(params['remote_host'])}:{params['remote_port']}/sim/vllm/kv_read"
        read = {
            "request_id": request_id,
            "engine_id": params["remote_engine_id"],
            "block_ids": params["remote_block_ids"],
        }
        try:
            status, answer = await post_json(url, read, timeout=self.config.pd_timeout_s)
        except PeerUnreachable as exc:
            status, answer = 0, str(exc)
        if status != 200:
            self.transfer_failures += 1
            raise HttpError(500, f"KV transfer failed for request {request_id}: {answer}", type="server_error")
        self.decodes += 1
        plan = self.hybrid_plan(req)
        plan.cacheable = False
        return plan

    async def kv_read(self, request: Request, response: Response) -> None:
        """Side channel: the decode reads (and thereby releases) the blocks it was promised."""
        body = parse_json(request)
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object")
        entry = self.kv.get(body.get("request_id"))
        if entry is None:
            raise HttpError(404, f"no prefilled KV for request id {body.get('request_id')!r}")
        if body.get("engine_id") != self.engine_id or body.get("block_ids") != entry.blocks:
            raise HttpError(409, "engine id or block ids do not match the prefill's")
        self.kv.free(entry.key)
        response.send_json(200, {"read": entry.blocks})


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
