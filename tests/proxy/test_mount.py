"""Mounting the proxy in front of Django, and the daphne socket option."""

from __future__ import annotations

import socket
from unittest import mock

from proxy.app import handles
from proxy.mount import enable_tcp_nodelay_under_twisted


def test_only_the_data_path_is_routed_to_the_proxy():
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/anything", "/health", "/metrics"):
        assert handles(path), path
    for path in ("/", "/admin/", "/api/nodes/", "/nodes/status", "/v1beta", "/healthz", "/dashboard/"):
        assert not handles(path), path


def test_daphne_client_sockets_get_tcp_nodelay(monkeypatch):
    from twisted.internet import tcp

    monkeypatch.setattr(tcp.Port, "transport", tcp.Server)
    assert enable_tcp_nodelay_under_twisted()
    assert enable_tcp_nodelay_under_twisted()  # idempotent
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, address = listener.accept()
    try:
        assert not accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        tcp.Port.transport(accepted, mock.Mock(), address, mock.Mock(), 1, mock.Mock())
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        for sock in (client, accepted, listener):
            sock.close()
