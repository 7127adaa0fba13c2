"""Path dispatch in front of Django: the data path's URLs go to the lean proxy app, everything
else (admin, REST API, ``/nodes/*``, WebSockets) to the wrapped ASGI application."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from routerpanel.proxylane import Lane

from .app import PREFIXES, ProxyApp, handles
from .transport import Receive, Scope, Send

# Any ASGI 3 application: Channels' router types its scope with asgiref's TypedDicts, the lean app
# with a plain mapping, so the parameters are left open.
FallbackApp = Callable[..., Awaitable[None]]


class ProxyMount:
    def __init__(self, proxy: ProxyApp, fallback: FallbackApp) -> None:
        self.proxy = proxy
        self.fallback = fallback
        # What the HTTP edge calls directly (``routerpanel.proxylane``): every path under these
        # prefixes is the proxy app's (``handles``).
        self.lane = Lane(proxy, tuple(prefix.encode() for prefix in PREFIXES))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if (kind == "http" and handles(scope["path"])) or kind == "lifespan":
            await self.proxy(scope, receive, send)
        else:
            await self.fallback(scope, receive, send)


def enable_tcp_nodelay_under_twisted() -> bool:
    """Disable Nagle's algorithm on client connections when daphne (Twisted) serves this process.

    uvloop already sets TCP_NODELAY on every connection; Twisted does not, so small SSE chunks could
    wait for the client's delayed ACK. Only acts when Twisted is already loaded (daphne imports it
    before the application), so uvicorn workers never pay for importing it. Returns whether it did.
    """
    tcp = sys.modules.get("twisted.internet.tcp")
    if tcp is None:
        return False
    if getattr(tcp.Port.transport, "routerpanel_nodelay", False):
        return True

    server_transport: Any = tcp.Port.transport  # a class found at run time, so mypy cannot see it

    class NoDelayServer(server_transport):
        routerpanel_nodelay = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            with contextlib.suppress(OSError):
                self.setTcpNoDelay(True)

    tcp.Port.transport = NoDelayServer
    return True
