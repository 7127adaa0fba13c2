"""Path dispatch in front of Django: the data path's URLs go to the lean proxy app, everything
else (admin, REST API, ``/nodes/*``, WebSockets) to the wrapped ASGI application."""

from __future__ import annotations

import contextlib
import sys

from .app import ProxyApp, handles
from .transport import Receive, Scope, Send


class ProxyMount:
    def __init__(self, proxy: ProxyApp, fallback) -> None:
        self.proxy = proxy
        self.fallback = fallback

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

    class NoDelayServer(tcp.Port.transport):  # type: ignore[misc, name-defined]
        routerpanel_nodelay = True

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            with contextlib.suppress(OSError):
                self.setTcpNoDelay(True)

    tcp.Port.transport = NoDelayServer
    return True
