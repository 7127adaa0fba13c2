"""The registry's fast path: apply NanoCtrl's change events as they are published.

NanoCtrl publishes on ``[scope:]nano_events:service_update`` on its Redis: ADD with the entity,
REMOVE with only ids. Expiry publishes nothing, so the periodic listing (Celery beat) stays the
source of truth; this listener only makes changes visible within a second or two. The Redis
address is the control plane's configured URL (NanoCtrl's ``/get_redis_address`` rewrites loopback
addresses to the host's outward IP, so it is not asked).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

import redis
from django.db import close_old_connections
from django.utils import timezone

from . import services
from .choices import ControlPlaneKind
from .masking import mask_credentials
from .models import ControlPlane
from .registry import RegistryEvent, event_channel, parse_event

logger = logging.getLogger(__name__)


@dataclass
class Subscription:
    """One Redis server and the channels (and their control planes) listened to on it."""

    url: str
    channels: dict[str, list[int]] = field(default_factory=dict)
    client: redis.Redis | None = None
    pubsub: redis.client.PubSub | None = None
    retry_at: float = 0.0
    subscribed: frozenset[str] = frozenset()

    def close(self) -> None:
        for closable in (self.pubsub, self.client):
            if closable is not None:
                with contextlib.suppress(redis.RedisError, OSError):
                    closable.close()
        self.pubsub = self.client = None
        self.subscribed = frozenset()


class RegistryListener:
    def __init__(self, *, reload_interval: float = 5.0, retry_interval: float = 1.0) -> None:
        self.reload_interval = reload_interval
        self.retry_interval = retry_interval
        self.subscriptions: dict[str, Subscription] = {}
        self._next_reload = 0.0

    # -- configuration -------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read which control planes want events, and on which Redis and channel."""
        wanted: dict[str, dict[str, list[int]]] = {}
        planes = ControlPlane.objects.filter(enabled=True, kind=ControlPlaneKind.NANOCTRL).exclude(redis_url="")
        for cp in planes:
            wanted.setdefault(cp.redis_url, {}).setdefault(event_channel(cp.scope), []).append(cp.pk)
        for url in set(self.subscriptions) - set(wanted):
            self.subscriptions.pop(url).close()
        for url, channels in wanted.items():
            sub = self.subscriptions.setdefault(url, Subscription(url=url))
            sub.channels = channels

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        logger.info("registry listener started")
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now >= self._next_reload:
                    close_old_connections()
                    self.reload()
                    self._next_reload = now + self.reload_interval
                if not self.subscriptions:
                    stop.wait(min(self.reload_interval, 1.0))
                    continue
                for sub in list(self.subscriptions.values()):
                    self.poll(sub, timeout=0.2 / len(self.subscriptions))
        finally:
            for sub in self.subscriptions.values():
                sub.close()
            logger.info("registry listener stopped")

    def poll(self, sub: Subscription, *, timeout: float) -> None:
        try:
            self._ensure_subscribed(sub)
            if sub.pubsub is None:
                time.sleep(timeout)
                return
            message = sub.pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
        except (redis.RedisError, OSError) as exc:
            logger.warning("registry events on %s unavailable (%s); reconnecting", mask_credentials(sub.url), exc)
            sub.close()
            sub.retry_at = time.monotonic() + self.retry_interval
            return
        if message and message.get("type") == "message":
            channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
            self.handle(sub.channels.get(channel, []), message["data"])

    def _ensure_subscribed(self, sub: Subscription) -> None:
        wanted = frozenset(sub.channels)
        if sub.pubsub is not None and sub.subscribed == wanted:
            return
        if time.monotonic() < sub.retry_at:
            return
        reconnect = sub.pubsub is None
        if reconnect:
            sub.client = redis.Redis.from_url(sub.url, socket_connect_timeout=2, health_check_interval=10)
            sub.pubsub = sub.client.pubsub()
        assert sub.pubsub is not None
        if sub.subscribed - wanted:
            sub.pubsub.unsubscribe(*(sub.subscribed - wanted))
        if wanted - sub.subscribed:
            sub.pubsub.subscribe(*(wanted - sub.subscribed))
        sub.subscribed = wanted
        logger.info("listening for registry events on %s: %s", mask_credentials(sub.url), ", ".join(sorted(wanted)))
        if reconnect:
            # Events published while we were away are lost: catch up with a full listing now.
            for ids in sub.channels.values():
                for control_plane_id in ids:
                    services.registry_sync(control_plane_id=control_plane_id)

    # -- events --------------------------------------------------------------------------------

    def handle(self, control_plane_ids: list[int], raw: bytes | str) -> None:
        try:
            event = parse_event(raw)
        except ValueError as exc:
            logger.warning("ignoring a malformed registry event: %s", exc)
            return
        for control_plane in ControlPlane.objects.filter(pk__in=control_plane_ids, enabled=True):
            try:
                self.apply(control_plane, event)
            except Exception:
                logger.exception("could not apply %s of %s", event.event_type, event.entity_id)

    @staticmethod
    def apply(control_plane: ControlPlane, event: RegistryEvent) -> str:
        kinds = control_plane.kinds or []
        if event.kind and kinds and event.kind not in kinds:
            return "ignored"
        if event.event_type == "ADD" and event.entity is not None:
            outcome = services.registry_apply_entity(
                control_plane=control_plane, entity=event.entity, now=timezone.now()
            )
        else:
            outcome = (
                "gone"
                if services.registry_mark_gone(control_plane=control_plane, entity_ids=[event.entity_id])
                else "unchanged"
            )
        logger.info("registry event %s %s on %s: %s", event.event_type, event.entity_id, control_plane, outcome)
        return outcome
