"""The registry listener as a real loop on a real Redis that goes away and comes back."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from django.db import OperationalError

from nodes import services
from nodes.listener import RegistryListener
from nodes.models import Node
from nodes.registry import event_channel
from tests.support.ports import closed_port
from tests.support.procs import RedisServer
from tests.support.wait import wait_until

pytestmark = pytest.mark.django_db(transaction=True, serialized_rollback=True)


def add_event(port: int, scope: str) -> str:
    payload = {
        "entity_id": f"dlengine-m-127.0.0.1:{port}",
        "entity_type": "service",
        "kind": "dlengine",
        "endpoint": {"host": "127.0.0.1", "port": port, "protocol": "http"},
        "metadata": {"served_model_name": "m", "role": "decode"},
    }
    event = {"event_type": "ADD", "entity_type": "service", "entity_id": payload["entity_id"], "kind": "dlengine"}
    return json.dumps({**event, "payload": payload})


def publish_until(url: str, channel: str, message: str, predicate, timeout: float = 10.0) -> float:
    """Publish ``message`` (again every 0.3 s, as the listener may still be reconnecting) until
    ``predicate()`` holds; returns the seconds it took. The listener's thread writes to the same
    in-memory SQLite database, which reports "table is locked" at once, with no wait, to a reader
    that comes while it writes: that reading is taken again on the next turn."""
    client = redis.Redis.from_url(url)
    started = time.monotonic()

    def applied() -> bool:
        try:
            if predicate():
                return True
        except OperationalError as exc:
            if "locked" not in str(exc):
                raise
        client.publish(channel, message)
        return False

    try:
        wait_until(applied, timeout, "the listener did not apply the event", interval=0.3)
    finally:
        client.close()
    return time.monotonic() - started


def test_the_listener_applies_events_and_reconnects_after_redis_restarts(tmp_path, settings, redis_url) -> None:
    events_redis = RedisServer(tmp_path).start()
    events_url = events_redis.url()
    cp = services.control_plane_create(
        actor=services.Actor.system(), name="cp", address=f"127.0.0.1:{closed_port()}", scope="s9", redis_url=events_url
    )
    channel = event_channel("s9")
    assert channel == "s9:nano_events:service_update"
    stop = threading.Event()
    listener = RegistryListener(reload_interval=0.2, retry_interval=0.2)
    thread = threading.Thread(target=listener.run, args=(stop,), daemon=True)
    thread.start()
    try:
        publish_until(
            events_url, channel, add_event(9001, "s9"), lambda: Node.objects.filter(control_plane=cp).exists()
        )
        assert Node.objects.get(control_plane=cp).role == "decode"

        events_redis.stop()
        # The listener notices (a failed read sets when to retry) and keeps retrying (it fails again).
        sub = listener.subscriptions[events_url]
        first_failure = wait_until(lambda: sub.retry_at, 5, "the listener never noticed Redis go away")
        wait_until(lambda: sub.retry_at != first_failure, 5, "the listener did not retry")
        events_redis.start()
        took = publish_until(
            events_url, channel, add_event(9002, "s9"), lambda: Node.objects.filter(control_plane=cp).count() == 2
        )
        assert took < 5.0
    finally:
        stop.set()
        thread.join(timeout=10)
        events_redis.stop()
    assert not thread.is_alive()
