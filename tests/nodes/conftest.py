"""API clients for the personas (tests/conftest.py) and a stub engine, for the registry's tests."""

from __future__ import annotations

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient


def _token_client(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token.key}")
    return client


@pytest.fixture
def admin_api(admin_user) -> APIClient:
    return _token_client(admin_user)


@pytest.fixture
def operator_api(operator_user) -> APIClient:
    return _token_client(operator_user)


@pytest.fixture
def outsider_api(outsider_user) -> APIClient:
    return _token_client(outsider_user)


@pytest.fixture
def anonymous_api() -> APIClient:
    return APIClient()


class _EngineStub:
    """What the stub engine answers, and what it was asked."""

    def __init__(self) -> None:
        self.models: list[str] = ["served-model"]
        self.models_status = 200
        self.terminate_status = 200
        self.health_status = 200
        self.calls: list[str] = []


@pytest.fixture
def engine_stub():
    """A tiny real HTTP server on a free port that answers ``/v1/models`` and ``/terminate`` like an
    engine. Yields ``(base_url, stub)``; change ``stub`` to change its answers."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    stub = _EngineStub()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            stub.calls.append(self.path)
            if self.path == "/v1/models":
                self._send(stub.models_status, {"object": "list", "data": [{"id": m} for m in stub.models]})
            elif self.path == "/health":
                self._send(stub.health_status, {"ok": stub.health_status == 200})
            elif self.path == "/terminate":
                self._send(stub.terminate_status, {"ok": stub.terminate_status == 200})
            else:
                self._send(404, {"error": "not found"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", stub
    finally:
        server.shutdown()
        server.server_close()
