"""The dashboard's WebSockets: the dashboard payload pushed to a staff member's page once, then what
changed every second (``dashboard.payload.payload_update``), and the Requests page's live tail
(``RequestsConsumer``, at the end).

Each connection runs its own loop (one database read through ``database_sync_to_async`` and one
Redis read per tick); a dashboard is watched by a handful of operators, so no fan-out of payloads
is needed. Every connection joins the ``GROUP`` on the channel layer (channels-redis), so any process
can ask all open dashboards to refresh at once (``notify_dashboards``), for example after a health
transition; the page may also send ``{"type": "refresh"}`` for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

import redis.asyncio as aioredis
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from nodes.live import keys
from nodes.live.breakers import read_breakers
from nodes.live.explain_store import RequestFilter, read_after
from nodes.live.health import parse_records
from nodes.live.stats import read_fleet_stats
from nodes.selectors import fleet_state

from .payload import REFRESH_SECONDS, DashboardPayload, build_payload, payload_update

logger = logging.getLogger(__name__)

# Close code for a connection that is not a staff member's (4000-4999: application codes).
FORBIDDEN = 4403
GROUP = "routerpanel.dashboard"
# The Requests page's tail: records per message at most, and the entry ids it may start after.
TAIL_MAX = 50
TAIL_CURSOR = re.compile(r"^[0-9]{1,19}(-[0-9]{1,19})?$")


async def admit_staff(consumer: AsyncJsonWebsocketConsumer) -> bool:
    """Whether the connecting user is an active staff member; anyone else is closed with ``FORBIDDEN``."""
    user = consumer.scope.get("user")
    # The scope's lazy user is typed as an AbstractBaseUser, which has no is_staff; at run time it is
    # a User or an AnonymousUser (whose is_staff is False).
    if user is None or not user.is_active or not getattr(user, "is_staff", False):
        await consumer.close(code=FORBIDDEN)
        return False
    return True


def live_redis() -> aioredis.Redis:
    """A connection's own client for the live state, with short timeouts: Redis may be away."""
    return aioredis.Redis.from_url(settings.ROUTERPANEL_REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5)


async def notify_dashboards() -> None:
    """Ask every open dashboard to send a fresh payload now (best effort: Redis may be down)."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(GROUP, {"type": "dashboard.refresh"})
    except Exception as exc:
        logger.debug("could not notify dashboards: %s", exc)


class DashboardConsumer(AsyncJsonWebsocketConsumer):
    interval = REFRESH_SECONDS
    groups = [GROUP]

    async def connect(self) -> None:
        if not await admit_staff(self):
            return
        self._redis = live_redis()
        self._wake = asyncio.Event()
        await self.accept()
        self._task = asyncio.create_task(self._push_loop(), name="routerpanel-dashboard-push")

    async def disconnect(self, code: int) -> None:
        task = getattr(self, "_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        client = getattr(self, "_redis", None)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "refresh":
            self._wake.set()

    async def dashboard_refresh(self, event: dict) -> None:
        """A ``dashboard.refresh`` message on the group: push now instead of at the next tick."""
        wake = getattr(self, "_wake", None)
        if wake is not None:
            wake.set()

    async def payload(self) -> DashboardPayload:
        live = await read_fleet_stats(self._redis)
        breakers = await read_breakers(self._redis) if live is not None else None  # no second wait on a dead Redis
        health = parse_records(await self._redis.hgetall(keys.HEALTH_RECORDS)) if live is not None else None
        state = await database_sync_to_async(fleet_state)(breakers, health)
        return build_payload(state, live, breakers)

    async def _push_loop(self) -> None:
        shown: DashboardPayload | None = None  # what the page shows: the next message is the difference
        while True:
            try:
                payload = await self.payload()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed tick (database locked, say) must not end the live view
                logger.exception("dashboard update failed")
            else:
                try:
                    await self.send_json(payload_update(shown, payload))
                except OSError:  # the client is gone (uvicorn's ClientDisconnected): nobody to update
                    return
                shown = payload
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()


class RequestsConsumer(AsyncJsonWebsocketConsumer):
    """The Requests page's live tail: once the page says what it shows (``{"type": "follow",
    "after": <its newest entry>, "filters": {...}}``), every second the request explanations that
    arrived since and match its filters, at most ``TAIL_MAX`` per message (when more arrived, the
    newest, with ``skipped`` set). Staff only, like the page."""

    interval = 1.0

    async def connect(self) -> None:
        if not await admit_staff(self):
            return
        self._redis = live_redis()
        self._task: asyncio.Task | None = None
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self._stop()
        client = getattr(self, "_redis", None)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _stop(self) -> None:
        task = getattr(self, "_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            self._task = None

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict) or content.get("type") != "follow":
            return
        # Imported here, not at the top: the REST API's serializers pull in DRF's fields and their
        # optional imports (tens of MB), which a web worker serving only /v1 never needs.
        from nodes.api.requests import RequestQuerySerializer

        raw = content.get("filters")
        query = RequestQuerySerializer(data={k: v for k, v in (raw if isinstance(raw, dict) else {}).items()})
        after = content.get("after")
        if not query.is_valid() or not isinstance(after, str) or not TAIL_CURSOR.match(after):
            await self.send_json({"type": "error", "detail": "Unusable filters for the live tail."})
            return
        await self._stop()
        self._task = asyncio.create_task(self._tail(after, query.wanted()), name="routerpanel-requests-tail")

    async def _tail(self, after: str, wanted: RequestFilter) -> None:
        live: bool | None = None
        while True:
            messages: list[dict[str, Any]] = []
            try:
                records, after, skipped = await read_after(self._redis, after, wanted, count=TAIL_MAX)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: say so once, keep trying
                logger.debug("the requests tail could not read Redis: %s", exc)
                if live is not False:
                    messages.append({"type": "status", "live": False})
                live = False
            else:
                if live is not True:
                    messages.append({"type": "status", "live": True})
                live = True
                if records or skipped:
                    messages.append({"type": "records", "records": records, "skipped": skipped})
            try:
                for message in messages:
                    await self.send_json(message)
            except OSError:  # the client is gone (uvicorn's ClientDisconnected): nobody to tell
                return
            await asyncio.sleep(self.interval)
