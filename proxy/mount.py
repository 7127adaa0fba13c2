"""Path dispatch in front of Django: the data path's URLs go to the lean proxy app, everything
else (admin, REST API, ``/nodes/*``, WebSockets) to the wrapped ASGI application."""

from __future__ import annotations

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
