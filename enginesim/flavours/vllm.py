"""vLLM 0.32: its request checks and error bodies, its KV connectors (two-stage PD) and data-parallel ranks.

Requests are checked as vLLM checks them (``vllm_checks``: schema, lengths, sampling parameters,
``X-data-parallel-rank``) and refused with vLLM's 400/404 bodies; unknown fields are accepted. Every
non-streaming answer carries ``"kv_transfer_params"`` (``null`` unless a connector returns some).

The ``prefill`` and ``decode`` roles run a KV connector (``--kv-connector``); ``hybrid`` runs none and
ignores ``kv_transfer_params``.

- ``NixlConnector`` (default). A request with ``kv_transfer_params.do_remote_decode`` is answered
  normally plus the params a NIXL prefill returns: ``do_remote_prefill: true, do_remote_decode: false,
  remote_block_ids`` (a list per KV-cache group), ``remote_engine_id, remote_request_id`` (the
  prefill's internal request id), ``remote_host, remote_port`` (here the simulator's own address, the
  side channel ``POST /sim/vllm/kv_read``), ``tp_size, dcp_size, pp_size, remote_num_tokens,
  remote_blocks_expiry_time, transfer_mode``. The blocks stay held until a decode pulls them or the
  lease (``KV_LEASE_S``) runs out. A request with ``do_remote_prefill`` pulls the blocks named by
  ``remote_request_id`` from the prefill, which releases them; a pull that fails is a 500 (vLLM's
  default ``kv_load_failure_policy`` is ``fail``). A request without params is computed locally.
- ``ExampleConnector``: returns no params (``"kv_transfer_params": null``) and ignores any it is given;
  the real one finds the KV in its shared storage by the prompt's tokens.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from enginesim.config import SimConfig
from enginesim.flavours.base import Flavour, blocks_for
from enginesim.flavours.vllm_checks import (
    check_lengths,
    check_schema,
    data_parallel_rank,
    read_body,
    vllm_error,
)
from enginesim.flavours.vllm_surface import NOT_FOUND, VllmSurface
from enginesim.http import Request, Response
from enginesim.inference import Handler, InferenceRequest, parse_json
from enginesim.kv import KvLedger
from enginesim.openai import HttpError, Plan, StreamStyle
from enginesim.peer import post_json
from enginesim.stats import RequestStats

VERSION = "0.32.0"  # what GET /version answers: the vLLM release the simulator follows
KV_LEASE_S = 30.0  # NIXL's kv_lease_duration default in vLLM 0.32 (renewed by the decode's heartbeats)
_REQUIRED = ("remote_engine_id", "remote_request_id", "remote_block_ids", "remote_host", "remote_port")


class VllmFlavour(Flavour):
    owned_by = "vllm"
    stream_style = StreamStyle(fingerprint=f"vllm-{VERSION}-5f4e3d2c")
    not_found = NOT_FOUND

    def __init__(self, config: SimConfig, kv: KvLedger, counters: RequestStats) -> None:
        super().__init__(config, kv, counters)
        self.engine_id = str(uuid.uuid4())
        self.connector = config.kv_connector if config.role != "hybrid" else None
        self.surface = VllmSurface(config, counters)
        self.reset()

    def reset(self) -> None:
        self.prefills = 0
        self.decodes = 0
        self.plain_decodes = 0
        self.transfer_failures = 0

    @property
    def generates(self) -> bool:
        return self.config.runner != "pooling"

    def routes(self) -> dict[tuple[str, str], Handler]:
        return {("GET", "/version"): self.version, **self.surface.routes()}

    def admin_routes(self) -> dict[tuple[str, str], Handler]:
        return {("POST", "/sim/vllm/kv_read"): self.kv_read}

    async def version(self, request: Request, response: Response) -> None:
        """``GET /version`` → ``{"version": "0.32.0"}``, as vLLM's OpenAI server answers."""
        self.counters.by_status["200"] += 1
        response.send_json(200, {"version": VERSION})

    def stats(self) -> dict[str, Any]:
        return {
            "engine_id": self.engine_id,
            "kv_connector": self.connector,
            "prefills": self.prefills,  # requests with do_remote_decode
            "decodes": self.decodes,  # requests that pulled a prefill's blocks
            "plain_decodes": self.plain_decodes,  # decode-role requests that pulled none
            "transfer_failures": self.transfer_failures,
        }

    # -- What vLLM refuses ------------------------------------------------------------------------

    def parse(self, request: Request, kind: str) -> InferenceRequest:
        body = check_schema(read_body(request), kind)
        model = body.get("model") or self.config.served_model_name
        if model not in self.config.accepted_model_names:
            message = f"The model `{model}` does not exist. Valid aliases: {self.config.served_model_name}."
            raise vllm_error(404, message, "NotFoundError", "model")
        lengths = check_lengths(body, kind, self.config.max_model_len)
        data_parallel_rank(request, self.config.dp_size)
        options = body.get("stream_options")
        return InferenceRequest(
            request=request,
            body=body,
            kind=kind,
            model=model,
            prompts=lengths.prompts,
            n=body.get("n") or 1,
            max_tokens=lengths.max_tokens,
            stream=bool(body.get("stream")),
            include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
        )

    # -- Answers ------------------------------------------------------------------------------------

    async def plan(self, req: InferenceRequest) -> Plan:
        params = req.body.get("kv_transfer_params") if self.connector else None
        params = params if isinstance(params, dict) else {}
        if params.get("do_remote_decode"):
            plan = self._prefill(req)
        elif params.get("do_remote_prefill") and self.connector == "NixlConnector":
            plan = await self._pull(req, params)
        else:
            if self.config.role == "decode":
                self.plain_decodes += 1
            plan = self.hybrid_plan(req)
        plan.extra.setdefault("kv_transfer_params", None)
        rid = req.header("x-request-id")
        if rid:  # vLLM names the answer after the request id it was given
            plan.response_id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + rid
            plan.cacheable = False
        return plan

    def _prefill(self, req: InferenceRequest) -> Plan:
        self.prefills += 1
        plan = self.hybrid_plan(req)
        if self.connector != "NixlConnector":
            return plan  # the ExampleConnector stores the KV by the prompt and returns nothing
        self.kv.expire_older_than(KV_LEASE_S)
        prefix = "chatcmpl-" if req.kind == "chat" else "cmpl-"
        suffix = "" if req.kind == "chat" else "-0"
        request_id = f"{prefix}{req.header('x-request-id') or uuid.uuid4().hex}{suffix}-{os.urandom(4).hex()}"
        entry = self.kv.allocate(request_id, blocks_for(plan.prompt_tokens, self.config.kv_block_size))
        plan.extra["kv_transfer_params"] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [entry.blocks],
            "remote_engine_id": self.engine_id,
            "remote_request_id": request_id,
            "remote_host": self.config.host,
            "remote_port": self.config.port,
            "tp_size": 1,
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": plan.prompt_tokens,
            "remote_blocks_expiry_time": None,
            "transfer_mode": "pull",
        }
        plan.kv_key = request_id
        return plan

    async def _pull(self, req: InferenceRequest, params: dict[str, Any]) -> Plan:
        """Pull the blocks the prefill named (which releases them there), then decode."""
        missing = [k for k in _REQUIRED if k not in params]
        request_id = params.get("remote_request_id")
        if missing:
            answer: Any = f"kv_transfer_params lack {', '.join(missing)}"
            status = 0
        else:
            url = f"http://{_host(str(params['remote_host']))}:{params['remote_port']}/sim/vllm/kv_read"
            read = {"request_id": request_id, "engine_id": params["remote_engine_id"]}
            read["block_ids"] = params["remote_block_ids"]
            status, answer = await post_json(url, read, timeout=self.config.pd_timeout_s)
        if status != 200:
            self.transfer_failures += 1
            raise vllm_error(500, f"KV transfer failed for request {request_id}: {answer}", "InternalServerError")
        self.decodes += 1
        return self.hybrid_plan(req, cacheable=False)

    async def kv_read(self, request: Request, response: Response) -> None:
        """Side channel: the decode pulls (and thereby releases) the blocks it was promised."""
        body = parse_json(request)
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object")
        entry = self.kv.get(body.get("request_id"))
        if entry is None:
            raise HttpError(404, f"no prefilled KV for request id {body.get('request_id')!r}")
        if body.get("engine_id") != self.engine_id or body.get("block_ids") != [entry.blocks]:
            raise HttpError(409, "engine id or block ids do not match the prefill's")
        self.kv.free(entry.key)
        response.send_json(200, {"read": entry.blocks})


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
