"""The hot path never touches the ORM and never blocks the event loop."""

from __future__ import annotations

import asyncio
import logging
from unittest import mock

import pytest
from asgiref.sync import sync_to_async
from django.db.backends.base.base import BaseDatabaseWrapper

from nodes.services import Actor, api_key_create, node_create
from proxy import snapshot as snapshots
from proxy.snapshot import build_snapshot
from tests.support.ports import free_port

from .conftest import call

ACTOR = Actor.system("test")


@pytest.fixture
def registry_snapshot(db):
    """Two nodes on free ports, an alias and a key, read into a snapshot through the real builder."""
    ports = [free_port(), free_port()]
    for port in ports:
        node_create(
            actor=ACTOR, url=f"http://127.0.0.1:{port}", models=["m"], model_path="/models/m-path", health="healthy"
        )
    _, plaintext = api_key_create(actor=ACTOR, name="k")
    return build_snapshot(), ports, plaintext


async def test_proxied_requests_make_no_database_query_and_do_not_block_the_loop(
    registry_snapshot, engines, proxy_app, caplog
):
    snap, ports, key = registry_snapshot
    for port in ports:
        await engines(f"e{port}", port=port)
    snapshots.install(snap)
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": "m-path", "messages": [{"role": "user", "content": "hi"}]}
    assert (await call(proxy_app, "POST", "/v1/chat/completions", json_body=body, headers=auth)).status == 200

    queries = []

    def forbidden(*args, **kwargs):
        queries.append(args)
        raise AssertionError("database access on the data path")

    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.05
    caplog.set_level(logging.WARNING, logger="asyncio")
    try:
        with (
            mock.patch.object(BaseDatabaseWrapper, "ensure_connection", forbidden),
            mock.patch.object(BaseDatabaseWrapper, "cursor", forbidden),
        ):
            for i in range(20):
                stream = i % 2 == 1
                response = await call(
                    proxy_app, "POST", "/v1/chat/completions", json_body={**body, "stream": stream}, headers=auth
                )
                assert response.status == 200
            assert (await call(proxy_app, "GET", "/v1/models", headers=auth)).status == 200
            assert (
                await call(proxy_app, "POST", "/v1/chat/completions", json_body={**body, "model": "x"}, headers=auth)
            ).status == 404
            assert (await call(proxy_app, "GET", "/metrics")).status == 200
            with pytest.raises(AssertionError):  # the guard does catch ORM use
                await sync_to_async(build_snapshot)()
            queries.clear()
    finally:
        loop.set_debug(False)
    assert queries == []
    slow = [r.getMessage() for r in caplog.records if r.name == "asyncio" and "took" in r.getMessage()]
    assert slow == []
    assert proxy_app.router.load.counts() == {}
