"""A node waiting for an operator's approval is in the routing table but never takes a request."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async

from nodes import services
from nodes.choices import NodeState
from proxy import snapshot as snapshots

from .conftest import call

pytestmark = pytest.mark.django_db(transaction=True)

ACTOR = services.Actor.system("test")
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def test_a_pending_node_gets_no_request_until_it_is_approved(engines, proxy_app) -> None:
    engine = await engines("pending")
    node = await sync_to_async(services.node_create)(
        actor=ACTOR, url=engine.url, models=["m"], state=NodeState.PENDING, health="healthy"
    )
    _, key = await sync_to_async(services.api_key_create)(actor=ACTOR, name="k")
    auth = {"Authorization": f"Bearer {key}"}
    snapshots.install(await sync_to_async(snapshots.build_snapshot)())

    response = await call(proxy_app, "POST", "/v1/chat/completions", json_body=BODY, headers=auth)
    assert response.status == 503
    assert response.json()["error"]["code"] == "no_routable_node"
    assert engine.received == []
    models = await call(proxy_app, "GET", "/v1/models", headers=auth)
    assert models.json()["data"] == []

    await sync_to_async(services.node_approve)(node=node, actor=ACTOR)
    snapshots.install(await sync_to_async(snapshots.build_snapshot)())
    response = await call(proxy_app, "POST", "/v1/chat/completions", json_body=BODY, headers=auth)
    assert response.status == 200
    assert len(engine.received) == 1
