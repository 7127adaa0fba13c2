"""Self-registration with NanoCtrl, as ``nanodeploy serve`` / ``dlengine serve`` do it.

``POST /register`` (entity id ``{kind}-{served}-{host}:{port}``, endpoint ``{host, port, protocol:
"http"}``, metadata ``served_model_name, model_path, role, host, port``), then ``POST /heartbeat`` every
``--heartbeat-interval`` seconds; a ``not_found`` heartbeat (the entity expired, or NanoCtrl restarted
on an empty Redis) registers again. ``POST /unregister`` on a clean shutdown. An unreachable NanoCtrl
is logged and retried at the next beat; the engine keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

from enginesim.config import SimConfig

logger = logging.getLogger("enginesim.registration")


def entity_for(config: SimConfig) -> dict[str, Any]:
    """The ``/register`` body for this engine."""
    kind = config.ctrl_kind or config.engine
    body: dict[str, Any] = {
        "entity_type": "service",
        "entity_id": f"{kind}-{config.served_model_name}-{config.host}:{config.port}",
        "kind": kind,
        "endpoint": {"host": config.host, "port": config.port, "protocol": "http"},
        "metadata": {
            "served_model_name": config.served_model_name,
            "model_path": config.model_path,
            "role": config.role,
            "host": config.host,
            "port": config.port,
        },
    }
    if config.ctrl_scope:
        body["scope"] = config.ctrl_scope
    return body


class Registrar:
    """Keeps this engine registered while it runs."""

    def __init__(self, config: SimConfig) -> None:
        assert config.ctrl_address
        address = config.ctrl_address
        self.base = (address if address.startswith(("http://", "https://")) else f"http://{address}").rstrip("/")
        self.interval = config.heartbeat_interval
        self.entity = entity_for(config)
        self.ids: dict[str, Any] = {
            k: self.entity[k] for k in ("entity_type", "entity_id", "scope") if k in self.entity
        }
        self.registered = False
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self._session is not None
        async with self._session.post(f"{self.base}/{path}", json=body) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    async def register(self) -> bool:
        try:
            answer = await self._post("register", self.entity)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            logger.warning("NanoCtrl %s unreachable, will retry: %s", self.base, exc)
            return False
        self.registered = answer.get("status") == "ok"
        if self.registered:
            logger.info("registered %s with NanoCtrl %s", self.entity["entity_id"], self.base)
        else:
            logger.warning("NanoCtrl rejected registration: %s", answer)
        return self.registered

    async def beat(self) -> None:
        if not self.registered:
            await self.register()
            return
        try:
            answer = await self._post("heartbeat", self.ids)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            logger.warning("heartbeat to NanoCtrl failed, still serving: %s", exc)
            return
        if answer.get("status") == "not_found":
            logger.info("NanoCtrl forgot %s; registering again", self.entity["entity_id"])
            await self.register()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0), trust_env=False)
        await self.register()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.beat()

    async def stop(self) -> None:
        """Stop beating and unregister (bounded: a dead NanoCtrl must not block shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is None:
            return
        if self.registered:
            try:
                await asyncio.wait_for(self._post("unregister", self.ids), 3.0)
                logger.info("unregistered %s", self.entity["entity_id"])
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                logger.warning("unregister failed: %s", exc)
        await self._session.close()
