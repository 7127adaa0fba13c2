"""SGLang PD by bootstrap dual dispatch, as strict as SGLang 0.5.23's server.

The router sends the same request, with ``bootstrap_host``, ``bootstrap_port`` and ``bootstrap_room``,
to a prefill and a decode at once. The fields are validated like SGLang's pydantic request models (lax
types; a wrong type is a 400 in SGLang's flat error shape). A missing room is a 400 (SGLang's
scheduler); a missing port is this engine's own bootstrap port (8998 by default). Rooms are expanded as
SGLang does for a batch of ``b`` prompts with ``n`` copies: an int room becomes ``room + i`` for each of
the ``b * n`` sequences, a list is repeated ``n`` times and indexed (too short: a 500; entries that
repeat: a 400 here, where the real engine would pair sequences wrongly).

As in SGLang, the prefill runs a bootstrap server (``--bootstrap-port``) and only the decode uses the
bootstrap address: here with ``POST /sim/bootstrap/claim {"rooms": [...]}``, which waits until the
prefill has received every room. A room that does not arrive on both legs within ``--pd-timeout-s``
fails both legs (prefill: 500 bootstrap timeout; decode: 500 bootstrap failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from enginesim.config import SimConfig
from enginesim.flavours.base import Flavour
from enginesim.http import Request, Response
from enginesim.inference import Handler, InferenceRequest, parse_json
from enginesim.kv import KvLedger
from enginesim.openai import HttpError, Plan, StreamStyle
from enginesim.peer import post_json
from enginesim.schema import Field, Invalid, ListOf, Model, Optional, Union, validate
from enginesim.stats import RequestStats

# SGLang's ``PDRoutingFields`` (``srt/entrypoints/openai/protocol.py``), the base of its chat and
# completion requests.
PD_ROUTING_FIELDS: Model = {
    "bootstrap_host": Field(Optional(Union((ListOf("str"), "str"))), required=False),
    "bootstrap_port": Field(Optional(Union((ListOf(Optional("int")), "int"))), required=False),
    "bootstrap_room": Field(Optional(Union((ListOf("int"), "int"))), required=False),
    "routed_dp_rank": Field(Optional("int"), required=False),
    "disagg_prefill_dp_rank": Field(Optional("int"), required=False),
}


@dataclass
class Room:
    registered: asyncio.Event = field(default_factory=asyncio.Event)
    claimed: asyncio.Event = field(default_factory=asyncio.Event)


VERSION = "0.5.23"  # the SGLang release the simulator follows


class SglangFlavour(Flavour):
    owned_by = "sglang"
    stream_style = StreamStyle(null_usage="completions")

    def __init__(self, config: SimConfig, kv: KvLedger, counters: RequestStats) -> None:
        super().__init__(config, kv, counters)
        self.rooms: dict[int, Room] = {}
        self.reset()

    def reset(self) -> None:
        self.rooms_ok = 0
        self.rooms_failed = 0
        self.claims = 0

    def routes(self) -> dict[tuple[str, str], Handler]:
        # ``/get_server_info`` is the older name, still served (with a deprecation warning).
        return {("GET", "/server_info"): self.server_info, ("GET", "/get_server_info"): self.server_info}

    async def server_info(self, request: Request, response: Response) -> None:
        """SGLang's server arguments, scheduler info and version (a few of its many fields)."""
        config = self.config
        self.counters.by_status["200"] += 1
        response.send_json(
            200,
            {
                "model_path": config.model_path,
                "served_model_name": config.served_model_name,
                "host": config.host,
                "port": config.port,
                "tp_size": config.tp_size,
                "dp_size": 1,
                "disaggregation_mode": "null" if config.role == "hybrid" else config.role,
                "disaggregation_bootstrap_port": config.bootstrap_port,
                "internal_states": [{}],
                "version": VERSION,
            },
        )

    def stats(self) -> dict[str, Any]:
        return {
            "bootstrap_port": self.config.bootstrap_port if self.config.role == "prefill" else None,
            "rooms_ok": self.rooms_ok,
            "rooms_failed": self.rooms_failed,
            "rooms_waiting": len(self.rooms),
            "claims": self.claims,
        }

    @staticmethod
    def error(status: int, message: str) -> HttpError:
        """SGLang's ``ErrorResponse``: flat, ``type`` "Bad Request" for a 400."""
        error_type = "Bad Request" if status == 400 else str(status)
        payload = {"object": "error", "message": message, "type": error_type, "param": None, "code": status}
        return HttpError(status, message, payload=payload)

    async def plan(self, req: InferenceRequest) -> Plan:
        try:
            fields = validate(PD_ROUTING_FIELDS, req.body)
        except Invalid as exc:
            raise self.error(400, f"1 validation error for request\n{exc}") from None
        if self.config.role == "hybrid":
            return self.hybrid_plan(req)
        rooms = self._rooms(req, fields["bootstrap_room"])
        if self.config.role == "prefill":
            await self._prefill(rooms)
            return self.hybrid_plan(req, limit=1, cacheable=False)
        else:
            host, port = fields["bootstrap_host"], fields["bootstrap_port"]
            if isinstance(host, list):
                host = host[0] if host else None
            if isinstance(port, list):
                port = port[0] if port else None
            if not isinstance(host, str):
                raise self.error(400, "Invalid request: the decode needs bootstrap_host to reach its prefill.")
            await self._decode(rooms, host, self.config.bootstrap_port if port is None else port)
            return self.hybrid_plan(req, cacheable=False)

    def _rooms(self, req: InferenceRequest, room: int | list[int] | None) -> list[int]:
        """One room per sequence (``batch * n`` of them), the way SGLang normalises the field."""
        if room is None:
            raise self.error(
                400,
                "Invalid request: Disaggregated request received without bootstrap room id. "
                f"req.rid={os.urandom(16).hex()}",
            )
        count = len(req.prompts) * req.n
        if isinstance(room, int):
            return [room + i for i in range(count)] if count > 1 else [room]
        expanded = room * req.n if count > 1 else room
        if len(expanded) < count:
            raise self.error(500, f"list index out of range: {len(room)} bootstrap rooms for {count} sequences")
        rooms = expanded[:count]
        if len(set(rooms)) != len(rooms):
            raise self.error(400, f"bootstrap rooms repeat across the {count} sequences: {rooms}")
        return rooms

    async def _prefill(self, rooms: list[int]) -> None:
        entries = [self.rooms.setdefault(r, Room()) for r in rooms]
        for entry in entries:
            entry.registered.set()
        try:
            async with asyncio.timeout(self.config.pd_timeout_s):
                for entry in entries:
                    await entry.claimed.wait()
        except TimeoutError:
            self.rooms_failed += len(rooms)
            raise self.error(500, f"bootstrap timeout: no decode joined room(s) {rooms}") from None
        finally:
            for r in rooms:
                self.rooms.pop(r, None)
        self.rooms_ok += len(rooms)

    async def _decode(self, rooms: list[int], host: str, port: int) -> None:
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        url = f"http://{host}:{port}/sim/bootstrap/claim"
        status, answer = await post_json(url, {"rooms": rooms}, timeout=self.config.pd_timeout_s + 5.0)
        if status != 200:
            self.rooms_failed += len(rooms)
            raise self.error(500, f"bootstrap failed for room(s) {rooms}: {answer}")
        self.rooms_ok += len(rooms)

    async def claim(self, request: Request, response: Response) -> None:
        """Bootstrap server: a decode joins rooms; wait until the prefill has them all."""
        body = parse_json(request)
        rooms = body.get("rooms") if isinstance(body, dict) else None
        if not isinstance(rooms, list) or not all(isinstance(r, int) for r in rooms):
            raise HttpError(400, 'body must be {"rooms": [int, ...]}')
        self.claims += 1
        created = [r for r in rooms if r not in self.rooms]
        entries = [self.rooms.setdefault(r, Room()) for r in rooms]
        joined = False
        try:
            async with asyncio.timeout(self.config.pd_timeout_s):
                for entry in entries:
                    await entry.registered.wait()
            joined = True
        except TimeoutError:
            raise HttpError(408, f"room(s) {rooms} never reached the prefill") from None
        finally:
            if not joined:  # timed out, or the decode gave up: forget the rooms no prefill took
                for r in created:
                    with contextlib.suppress(KeyError):
                        if not self.rooms[r].registered.is_set():
                            del self.rooms[r]
        for entry in entries:
            entry.claimed.set()
        response.send_json(200, {"rooms": rooms})


class BootstrapApp:
    """The prefill's bootstrap server (its own port), answering decodes that join rooms."""

    def __init__(self, flavour: SglangFlavour) -> None:
        self.flavour = flavour

    def handle_fast(self, request: Request) -> bytes | None:
        return None

    async def handle(self, request: Request, response: Response) -> None:
        try:
            if (request.method, request.path) == ("POST", "/sim/bootstrap/claim"):
                await self.flavour.claim(request, response)
            elif request.path == "/health":
                response.send(200, b"OK", "text/plain")
            else:
                raise HttpError(404, f"no route {request.method} {request.path}")
        except HttpError as err:
            response.send_json(err.status, err.body())
