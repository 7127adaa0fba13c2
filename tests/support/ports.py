"""Ports for tests: free ones for the processes a test starts, and closed ones for a test that
needs a connection refused. Nothing in the suite may assume a fixed port is free or closed (a
developer's NanoCtrl on 4479, Redis on 6379 or web server on 8000 must not change a result)."""

from __future__ import annotations

import socket

from enginesim.testing import free_port, free_port_block

__all__ = ["closed_port", "free_port", "free_port_block"]

# Sockets bound for the whole test session and never listened on: see closed_port().
_held: list[socket.socket] = []


def closed_port(which: int = 0) -> int:
    """A port on 127.0.0.1 that refuses every connection for the rest of the session (``which``
    tells apart the few a test may need at once: ``closed_port(1)`` is a second one).

    The port is bound by a socket this process keeps open without listening, so a connection gets
    ECONNREFUSED at once, from this process or any other, and no program can start listening on it
    while the tests run, which a merely unused port (or port 1, 9 or 4479) cannot promise.
    """
    while len(_held) <= which:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        _held.append(sock)
    return _held[which].getsockname()[1]
