"""The registry listener as a real loop on a real Redis that goes away and comes back."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
import redis

from nodes import services
from nodes.listener import RegistryListener
from nodes.localredis import redis_server_argv
from nodes.models import Node
from nodes.registry import event_channel
from tests.procs import free_port, stop_process, wait_for_port

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


def start_redis(port: int, tmp_path) -> subprocess.Popen:
    proc = subprocess.Popen(redis_server_argv(port=port, data_dir=tmp_path), stdout=subprocess.DEVNULL)
    wait_for_port(port, proc=proc)
    return proc


def publish_until(url: str, channel: str, message: str, predicate, timeout: float = 10.0) -> float:
    """Publish ``message`` (again every 0.3 s, as the listener may still be reconnecting) until
    ``predicate()`` holds; returns the seconds it took."""
    client = redis.Redis.from_url(url)
    started = time.monotonic()
    try:
        while not predicate():
            if time.monotonic() - started > timeout:
                raise AssertionError("the listener did not apply the event")
            client.publish(channel, message)
            time.sleep(0.3)
    finally:
        client.close()
    return time.monotonic() - started


def test_the_listener_applies_events_and_reconnects_after_redis_restarts(tmp_path, settings, redis_url) -> None:
    events_port = free_port()
    events_url = f"redis://127.0.0.1:{events_port}/0"
    events_redis = start_redis(events_port, tmp_path)
    cp = services.control_plane_create(
        actor=services.Actor.system(), name="cp", address="127.0.0.1:1", scope="s9", redis_url=events_url
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

        stop_process(events_redis)
        time.sleep(1.0)  # the listener notices and keeps retrying
        events_redis = start_redis(events_port, tmp_path)
        took = publish_until(
            events_url, channel, add_event(9002, "s9"), lambda: Node.objects.filter(control_plane=cp).count() == 2
        )
        assert took < 5.0
    finally:
        stop.set()
        thread.join(timeout=10)
        stop_process(events_redis)
    assert not thread.is_alive()
