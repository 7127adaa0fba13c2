"""LMDeploy PD by migration (DistServe), as strict as LMDeploy's api_server (default: release 0.18).

Link (once per prefill/decode pair, made by the router): ``GET /distserve/engine_info`` answers the
engine config as a JSON string of JSON; ``POST /distserve/p2p_initialize`` validates a full
``DistServeInitRequest`` (``local_engine_id`` must name this engine's host: the engine binds its ZMQ
socket there) and answers ``DistServeInitResponse`` (a ZMQ address, one KV-transfer endpoint per TP
rank); ``POST /distserve/p2p_connect`` validates ``DistServeConnectionRequest`` and needs the *peer's*
init answer for a peer this engine was initialised with.

Prefill (``with_cache``): the answer adds ``cache_block_ids`` and ``remote_token_ids`` (``[first
token]``); ``preserve_cache`` keeps the blocks. The ``id`` names no session from 0.15 on (chat
``chatcmpl-…``; completions echo the client's ``session_id``, default ``-1``); with
``--cache-session-id`` the session is in ``cache_session_id``; on 0.14 the chat ``id`` is the session.

Decode (``migration_request``, validated inside the handler: a bad one is a 500): needs a link with
``remote_engine_id``, as many blocks as its own prompt takes, reads them from the prefill (side channel
``POST /sim/lmdeploy/migrate``) and then frees ``remote_session_id`` there, as the engine does over ZMQ.
A session id that names nothing frees nothing: the preserved blocks stay (LMDeploy's known leak).

``POST /distserve/free_cache`` validates ``{remote_engine_id, remote_session_id}`` and answers
``{"status": "SUCCESS"}`` whatever it held. Validation errors: 400 with LMDeploy's flat ``ErrorResponse``
(0.16+), 422 ``{"detail", "body"}`` before.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from enginesim.config import SimConfig
from enginesim.flavours.base import Flavour, blocks_for
from enginesim.flavours.lmdeploy_models import (
    CACHE_FREE_REQUEST,
    CONNECT_REQUEST,
    CONNECTION_STATUS_SUCCESS,
    DROP_CONNECTION_REQUEST,
    INIT_REQUEST,
    MIGRATION_REQUEST,
    RDMA,
)
from enginesim.http import Request, Response
from enginesim.inference import Handler, InferenceRequest, parse_json
from enginesim.kv import KvLedger
from enginesim.openai import HttpError, Plan, StreamStyle, dumps
from enginesim.peer import post_json
from enginesim.schema import Invalid, Model, validate
from enginesim.stats import RequestStats
from enginesim.textgen import count_prompt_tokens

_ALPHABET = string.ascii_letters + string.digits


def _version(text: str) -> tuple[int, int]:
    major, minor, *_ = [*text.split("."), "0", "0"][:3]
    return int(major), int(minor)


def internal_error(message: str) -> HttpError:
    """What FastAPI answers for an exception no handler catches: 500, plain text."""
    return HttpError(500, message, payload="Internal Server Error")


@dataclass(frozen=True)
class LmdeployStyle(StreamStyle):
    """LMDeploy 0.18's streams (``chat_completions/serving.py``, ``endpoints/completions.py``): the
    usage chunk's ``UsageInfo`` in its field order; chat's built with the prefix-cache details and
    dumped by pydantic (compact), completions' dumped by ``json.dumps`` like the other chunks."""

    def usage_event(self, chunk: dict[str, Any], kind: str) -> bytes:
        counts = chunk["usage"]
        usage = {name: counts[name] for name in ("prompt_tokens", "total_tokens", "completion_tokens")}
        if kind == "chat":
            usage["prompt_tokens_details"] = {"cached_tokens": 0}
            return b"data: " + dumps({**chunk, "usage": usage}) + b"\n\n"
        return b"data: " + json.dumps({**chunk, "usage": usage}).encode() + b"\n\n"


class LmdeployFlavour(Flavour):
    owned_by = "lmdeploy"
    stream_style = LmdeployStyle(spaced=True, null_usage="asked", omit_none=True)

    def __init__(self, config: SimConfig, kv: KvLedger, counters: RequestStats) -> None:
        super().__init__(config, kv, counters)
        self.version = _version(config.lmdeploy_version)
        self.url = f"http://{config.host}:{config.port}"
        self.next_session_id = 0  # LMDeploy numbers sessions from 0 upwards, never reusing one
        self.initialized: dict[str, int] = {}  # peer engine id -> its link number
        self.connected: set[str] = set()
        self.released_by_migration: set[int] = set()
        self.reset()

    def reset(self) -> None:
        """Counters only: links, like a running engine's, survive a reset."""
        self.handshakes: dict[str, int] = {"p2p_initialize": 0, "p2p_connect": 0}
        self.engine_info_calls = 0
        self.migrations_in = 0
        self.migration_failures = 0
        self.zmq_frees = 0  # prefill sessions a decode released after reading them
        self.invalid_frees = 0  # frees of a session already released (LMDeploy logs "invalid free")
        self.released_by_migration.clear()

    def routes(self) -> dict[tuple[str, str], Handler]:
        return {
            ("GET", "/distserve/engine_info"): self.engine_info,
            ("POST", "/distserve/p2p_initialize"): self.p2p_initialize,
            ("POST", "/distserve/p2p_connect"): self.p2p_connect,
            ("POST", "/distserve/p2p_drop_connect"): self.p2p_drop_connect,
            ("POST", "/distserve/free_cache"): self.free_cache,
        }

    def admin_routes(self) -> dict[tuple[str, str], Handler]:
        return {
            ("POST", "/sim/lmdeploy/migrate"): self.migrate,
            ("POST", "/sim/lmdeploy/drop_links"): self.drop_links,
        }

    def stats(self) -> dict[str, Any]:
        return {
            "version": self.config.lmdeploy_version,
            "handshakes": dict(self.handshakes),
            "engine_info": self.engine_info_calls,
            "links": sorted(self.connected),
            "migrations_in": self.migrations_in,
            "migration_failures": self.migration_failures,
            "zmq_frees": self.zmq_frees,
            "invalid_frees": self.invalid_frees,
        }

    # -- Errors in LMDeploy's shapes -----------------------------------------------------------

    def _invalid(self, exc: Invalid, body: Any) -> HttpError:
        if self.version >= (0, 16):
            return self.error(400, str(exc))
        detail = [{"type": exc.kind, "loc": ["body", *exc.loc], "msg": exc.message, "input": exc.value}]
        return HttpError(422, str(exc), payload={"detail": detail, "body": body})

    @staticmethod
    def error(status: int, message: str) -> HttpError:
        """LMDeploy's ``ErrorResponse``: flat, not nested under ``error``."""
        error_type = "server_error" if status >= 500 else "invalid_request_error"
        payload = {"message": message, "type": error_type, "code": status, "param": None, "object": "error"}
        return HttpError(status, message, payload=payload)

    def _body(self, request: Request, model: Model) -> dict[str, Any]:
        body = parse_json(request)
        try:
            return validate(model, body)
        except Invalid as exc:
            raise self._invalid(exc, body) from None

    # -- Inference -----------------------------------------------------------------------------

    async def plan(self, req: InferenceRequest) -> Plan:
        body = req.body
        migration = body.get("migration_request")
        with_cache, preserve = bool(body.get("with_cache")), bool(body.get("preserve_cache"))
        if req.kind == "chat" and req.n > 1 and (migration or with_cache or preserve):
            raise self.error(400, "n > 1 is not supported with cache migration.")
        if migration:
            return await self._decode(req, migration)
        if with_cache:
            return self._prefill(req, preserve)
        return self.hybrid_plan(req)

    def _prefill(self, req: InferenceRequest, preserve: bool) -> Plan:
        plan = self.hybrid_plan(req, cacheable=False)
        session_id = self.next_session_id
        self.next_session_id += 1
        first = plan.choices[0].token_ids[0]
        blocks = blocks_for(count_prompt_tokens(req.prompts[0]), self.config.kv_block_size)
        entry = self.kv.allocate(session_id, blocks, token=first)
        if not preserve:
            self.kv.free(session_id)  # the session ends with the request
        plan.extra["cache_block_ids"] = entry.blocks
        plan.extra["remote_token_ids"] = [first]
        if self.config.cache_session_id:
            plan.extra["cache_session_id"] = session_id
        if req.kind == "completion":
            user = req.body.get("session_id", -1)
            plan.response_id = str(user if isinstance(user, int) else -1)
        elif self.version >= (0, 15):
            plan.response_id = "chatcmpl-" + "".join(_ALPHABET[b % len(_ALPHABET)] for b in os.urandom(22))
        else:
            plan.response_id = str(session_id)
        plan.kv_key = session_id if preserve else None
        return plan

    async def _decode(self, req: InferenceRequest, raw: Any) -> Plan:
        try:
            mr = validate(MIGRATION_REQUEST, raw, ("migration_request",))
        except Invalid as exc:  # validated inside the handler: no handler turns it into a 4xx
            self.migration_failures += 1
            raise internal_error(f"migration_request: {exc}") from None
        prefill = mr["remote_engine_id"]
        if prefill not in self.connected:
            self.migration_failures += 1
            raise internal_error(f"no p2p link with {prefill}")
        own = blocks_for(count_prompt_tokens(req.prompts[0]), self.config.kv_block_size)
        if len(mr["remote_block_ids"]) != own:
            self.migration_failures += 1
            raise internal_error(f"{len(mr['remote_block_ids'])} remote blocks for a sequence of {own}")
        read = {
            "decode": self.url,
            "block_ids": mr["remote_block_ids"],
            "token_id": mr["remote_token_id"],
            "session_id": mr["remote_session_id"],
        }
        status, answer = await post_json(
            prefill.rstrip("/") + "/sim/lmdeploy/migrate", read, timeout=self.config.pd_timeout_s
        )
        if status != 200:
            self.migration_failures += 1
            raise self.error(500, f"migration failed: {answer}")
        self.migrations_in += 1
        return self.hybrid_plan(req, cacheable=False)

    async def migrate(self, request: Request, response: Response) -> None:
        """The prefill side of a migration: the decode's RDMA read, then its ZMQ free of the session."""
        body = parse_json(request)
        if body.get("decode") not in self.connected:
            raise HttpError(409, f"no p2p link with {body.get('decode')}")
        entry = next((e for e in self.kv.entries.values() if e.blocks == body.get("block_ids")), None)
        if entry is None:
            raise HttpError(409, "those blocks are not held here")
        if body.get("token_id") != entry.meta.get("token"):
            raise HttpError(409, "the token id is not the one the prefill generated")
        session = body.get("session_id")
        if self.kv.get(session) is not None:
            self.kv.free(session)
            self.released_by_migration.add(session)
            self.zmq_frees += 1
        else:
            self.invalid_frees += 1  # a session id that names nothing: the blocks stay held
        response.send_json(200, {"blocks": entry.blocks})

    async def free_cache(self, request: Request, response: Response) -> None:
        session = self._body(request, CACHE_FREE_REQUEST)["remote_session_id"]
        if session in self.released_by_migration:
            self.released_by_migration.discard(session)
            self.invalid_frees += 1  # the decode already released it: LMDeploy only logs this
        else:
            self.kv.free(session)
        self.counters.by_status["200"] += 1
        response.send_json(200, {"status": "SUCCESS"})

    # -- The p2p link --------------------------------------------------------------------------

    def engine_config(self) -> dict[str, Any]:
        return {
            "tp_size": self.config.tp_size,
            "ep_size": 1,
            "dp_size": 1,
            "pp_size": None,
            "dp_rank": 0,
            "block_size": self.config.kv_block_size,
            "num_cpu_blocks": 0,
            "num_gpu_blocks": 4096,
        }

    async def engine_info(self, request: Request, response: Response) -> None:
        self.engine_info_calls += 1
        self.counters.by_status["200"] += 1
        # The endpoint returns ``model_dump_json()``: a str, which FastAPI encodes as a JSON string.
        response.send_json(200, json.dumps(self.engine_config(), separators=(",", ":")))

    def _own_host(self, engine_id: str) -> bool:
        host = urlsplit(engine_id).hostname
        own = self.config.host
        return own in ("0.0.0.0", "::") or host == own or (own == "127.0.0.1" and host == "localhost")

    async def p2p_initialize(self, request: Request, response: Response) -> None:
        init = self._body(request, INIT_REQUEST)
        if not self._own_host(init["local_engine_id"]):
            raise internal_error(f"cannot bind ZMQ on {init['local_engine_id']}")
        if init["protocol"] != RDMA:
            raise internal_error("only RDMA migration is implemented")
        self.handshakes["p2p_initialize"] += 1
        link = self.initialized[init["remote_engine_id"]] = len(self.initialized) + 1
        pools = [{"shape": [4096, self.config.kv_block_size, 2, 128], "dtype": "bfloat16", "element_size": 2}]
        endpoints = []
        for rank in range(self.config.tp_size):
            info = {"engine": self.url, "peer": init["remote_engine_id"], "rank": rank, "link": link}
            endpoint: dict[str, Any] = {"protocol": RDMA, "endpoint_info": json.dumps(info)}
            if self.version >= (0, 17):
                endpoint["cache_pools"] = [{**pool, "entry_axis": 0} for pool in pools]
            endpoints.append(endpoint)
        self.counters.by_status["200"] += 1
        response.send_json(
            200,
            {
                "status": CONNECTION_STATUS_SUCCESS,
                "engine_endpoint_info": {"zmq_address": f"tcp://{self.config.host}:{20000 + link}"},
                "kvtransfer_endpoint_info": endpoints,
            },
        )

    async def p2p_connect(self, request: Request, response: Response) -> None:
        conn = self._body(request, CONNECT_REQUEST)
        peer = conn["remote_engine_id"]
        if peer not in self.initialized:
            raise internal_error(f"p2p_connect with {peer} before p2p_initialize")
        endpoints = conn["remote_kvtransfer_endpoint_info"]
        if len(endpoints) < self.config.tp_size:
            raise internal_error(f"{len(endpoints)} KV-transfer endpoints for {self.config.tp_size} TP ranks")
        for endpoint in endpoints:
            try:
                info = json.loads(endpoint["endpoint_info"])
            except ValueError:
                raise internal_error("endpoint_info is not the JSON an engine produced") from None
            if not isinstance(info, dict) or info.get("engine") != peer or info.get("peer") != self.url:
                raise internal_error(f"endpoint info {info} is not {peer}'s answer to an initialisation with us")
        self.handshakes["p2p_connect"] += 1
        self.connected.add(peer)
        self.counters.by_status["200"] += 1
        response.send_json(200, {"status": CONNECTION_STATUS_SUCCESS})

    async def p2p_drop_connect(self, request: Request, response: Response) -> None:
        peer = self._body(request, DROP_CONNECTION_REQUEST)["remote_engine_id"]
        self.connected.discard(peer)
        self.initialized.pop(peer, None)
        self.counters.by_status["200"] += 1
        response.send_json(200, {"success": True})

    async def drop_links(self, request: Request, response: Response) -> None:
        """Forget every link, as a restarted engine has (``/sim/*``, not an engine endpoint)."""
        self.connected.clear()
        self.initialized.clear()
        response.send_json(200, {"links": []})
