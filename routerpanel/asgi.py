"""ASGI entry point: Channels' protocol router in front of Django.

HTTP goes to Django (admin, REST API, DLRouter-compatible ``/nodes/*``); WebSockets go to the
Channels consumers. The OpenAI data path (``/v1``) is mounted here too, as a lean ASGI app, so
it does not pay for Django's request handling on every proxied call.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from routerpanel.lean import web_worker_imports

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "routerpanel.settings")

# Django must be set up before anything imports models; without the optional packages a web worker
# never uses (routerpanel/lean.py).
with web_worker_imports():
    django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator

from proxy.app import get_app
from proxy.mount import ProxyMount, enable_tcp_nodelay_under_twisted
from routerpanel.routing import websocket_urlpatterns

# Under daphne, client sockets get TCP_NODELAY as uvloop gives them under uvicorn (SSE latency).
enable_tcp_nodelay_under_twisted()

# `/v1/*`, `/health` and `/metrics` (and uvicorn's lifespan events) go to the proxy app.
application = ProxyMount(
    get_app(),
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
        }
    ),
)
