"""SGLang PD by bootstrap dual dispatch.

The router sends the same request, with ``bootstrap_host``, ``bootstrap_port`` and ``bootstrap_room``
(an int, or a list with one room per batch entry and per ``n`` copy), to a prefill and a decode at once.
As in SGLang, the prefill runs a bootstrap server (``--bootstrap-port``, default 8998) and the decode
contacts it: here with ``POST /sim/bootstrap/claim {"rooms": [...]}``, which waits until the prefill has
received every room. A room that does not arrive on both legs within ``--pd-timeout-s`` fails both legs
(prefill: 500 bootstrap timeout; decode: 500 bootstrap failed).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from enginesim.config import SimConfig
from enginesim.flavours.base import Flavour
from enginesim.http import Request, Response
from enginesim.inference import InferenceRequest, parse_json
from enginesim.kv import KvLedger
from enginesim.openai import HttpError, Plan
from enginesim.peer import PeerUnreachable, post_json
from enginesim.stats import RequestStats


@dataclass
class Room:
    registered: asyncio.Event = field(default_factory=asyncio.Event)
    claimed: asyncio.Event = field(default_factory=asyncio.Event)


class SglangFlavour(Flavour):
    def __init__(self, config: SimConfig, kv: KvLedger, counters: RequestStats) -> None:
        super().__init__(config, kv, counters)
        self.rooms: dict[int, Room] = {}
        self.reset()

    def reset(self) -> None:
        self.rooms_ok = 0
        self.rooms_failed = 0
        self.claims = 0

    def stats(self) -> dict[str, Any]:
        return {
            "bootstrap_port": self.config.bootstrap_port if self.config.role == "prefill" else None,
            "rooms_ok": self.rooms_ok,
            "rooms_failed": self.rooms_failed,
            "rooms_waiting": len(self.rooms),
            "claims": self.claims,
        }

    async def plan(self, req: InferenceRequest) -> Plan:
        if self.config.role == "hybrid":
            return self.hybrid_plan(req)
        rooms = self._rooms(req)
        host, port = req.body.get("bootstrap_host"), req.body.get("bootstrap_port")
        if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
            raise HttpError(400, "bootstrap_host (str) and bootstrap_port (int) are required in PD mode")
        if self.config.role == "prefill":
            await self._prefill(rooms, host, port)
            plan = self.hybrid_plan(req, limit=1)
        else:
            await self._decode(rooms, host, port)
            plan = self.hybrid_plan(req)
        plan.cacheable = False
        return plan

    @staticmethod
    def _rooms(req: InferenceRequest) -> list[int]:
        room = req.body.get("bootstrap_room")
        batch = len(req.prompts)
        if isinstance(room, int) and not isinstance(room, bool):
            if batch * req.n != 1:
                raise HttpError(400, f"a batch of {batch} prompt(s) with n={req.n} needs a list of bootstrap rooms")
            return [room]
        if isinstance(room, list) and room and all(isinstance(r, int) and not isinstance(r, bool) for r in room):
            if len(room) not in (batch, batch * req.n):
                raise HttpError(400, f"{len(room)} bootstrap rooms for a batch of {batch} with n={req.n}")
            if len(set(room)) != len(room):
                raise HttpError(400, "bootstrap rooms must be distinct")
            return room
        raise HttpError(400, "bootstrap_room (int or list of ints) is required in PD mode")

    def _own_address(self, host: str, port: int) -> bool:
        if port != self.config.bootstrap_port:
            return False
        own = self.config.host
        return own in ("0.0.0.0", "::") or host.strip("[]") in (own, "localhost" if own == "127.0.0.1" else own)

    async def _prefill(self, rooms: list[int], host: str, port: int) -> None:
        if not self._own_address(host, port):
            self.rooms_failed += len(rooms)
            raise HttpError(
                400,
                f"bootstrap address {host}:{port} is not this prefill's "
                f"({self.config.host}:{self.config.bootstrap_port})",
            )
        entries = [self.rooms.setdefault(r, Room()) for r in rooms]
        for entry in entries:
            entry.registered.set()
        try:
            async with asyncio.timeout(self.config.pd_timeout_s):
                for entry in entries:
                    await entry.claimed.wait()
        except TimeoutError:
            self.rooms_failed += len(rooms)
            raise HttpError(500, f"bootstrap timeout: no decode joined room(s) {rooms}", type="server_error") from None
        finally:
            for r in rooms:
                self.rooms.pop(r, None)
        self.rooms_ok += len(rooms)

    async def _decode(self, rooms: list[int], host: str, port: int) -> None:
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        url = f"http://{host}:{port}/sim/bootstrap/claim"
        try:
            status, answer = await post_json(url, {"rooms": rooms}, timeout=self.config.pd_timeout_s + 5.0)
        except PeerUnreachable as exc:
            status, answer = 0, str(exc)
        if status != 200:
            self.rooms_failed += len(rooms)
            raise HttpError(500, f"bootstrap failed for room(s) {rooms}: {answer}", type="server_error")
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
        try:
            async with asyncio.timeout(self.config.pd_timeout_s):
                for entry in entries:
                    await entry.registered.wait()
        except TimeoutError:
            for r in created:
                with contextlib.suppress(KeyError):
                    if not self.rooms[r].registered.is_set():
                        del self.rooms[r]
            raise HttpError(408, f"room(s) {rooms} never reached the prefill") from None
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
