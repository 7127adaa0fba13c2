"""What a web server could get wrong on its own, under uvicorn (the default) and daphne: the
health endpoint and the dashboard's WebSocket. With the tests marked ``servers`` in the other
modules (a chat completion, /v1/models and streams through the official client, SSE headers,
client disconnects, the OpenAI-shaped 4xx answers, a PD stream) they are daphne's smoke set."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.support.ports import closed_port
from tests.support.stack import RouterPanelStack

pytestmark = pytest.mark.e2e


@pytest.mark.servers("uvicorn", "daphne")
def test_health_answers_with_the_routing_snapshots_version(stack: RouterPanelStack) -> None:
    response = httpx.get(stack.base + "/health", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["snapshot_version"] == stack.config_version()


@pytest.mark.servers("uvicorn", "daphne")
def test_the_dashboard_websocket_pushes_the_fleet_to_staff(stack: RouterPanelStack) -> None:
    stack.add_node(f"http://127.0.0.1:{closed_port()}", ["ws-model"], name="ws-engine")
    with stack.admin_session() as session:
        cookie = f"sessionid={session.cookies['sessionid']}"
    url = stack.base.replace("http://", "ws://") + "/ws/dashboard/"
    with connect(url, origin=stack.base, additional_headers={"Cookie": cookie}, open_timeout=10) as socket:
        payload = json.loads(socket.recv(timeout=10))
        assert [node["name"] for node in payload["nodes"]] == ["ws-engine"]
        assert "ws-model" in [model["name"] for model in payload["models"]]
        socket.send(json.dumps({"type": "refresh"}))
        assert json.loads(socket.recv(timeout=10))["type"] == "update"  # what changed since


@pytest.mark.servers("uvicorn", "daphne")
def test_the_dashboard_websocket_turns_away_anonymous_visitors(stack: RouterPanelStack) -> None:
    url = stack.base.replace("http://", "ws://") + "/ws/dashboard/"
    with pytest.raises(InvalidStatus) as refused, connect(url, origin=stack.base, open_timeout=10):
        pass
    assert refused.value.response.status_code == 403
