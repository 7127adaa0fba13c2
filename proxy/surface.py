"""The OpenAI-compatible surface beyond chat and completions: which paths the proxy routes by the
body's model like chat, which node endpoint each one needs, and ``GET /v1/models/{id}``.

Each path below is forwarded unchanged (the body with only ``model`` rewritten, the engine's
status and body passed back; a streamed ``/v1/responses`` relayed as SSE) to a hybrid node of the
model that serves the endpoint (``Node.endpoints``, defaults per engine type in
``nodes.rules.DEFAULT_ENDPOINTS``), through the same attempt loop as chat (``proxy.hybrid``). These
endpoints have no prefill/decode split (docs/architecture.md).
"""

from __future__ import annotations

import json

from nodes.choices import Endpoint
from nodes.rules import ENDPOINT_PATHS

from .errors import ProxyError
from .snapshot import KeyView, Route, Snapshot

# A field the request must carry (the others are the engine's to check).
_REQUIRED = {Endpoint.CHAT.value: "messages", Endpoint.COMPLETIONS.value: "prompt"}

# Client path (``nodes.rules.ENDPOINT_PATHS``) -> (endpoint a node must serve, required field or "").
PATHS: dict[str, tuple[str, str]] = {path: (e, _REQUIRED.get(e, "")) for e, path in ENDPOINT_PATHS.items()}

# Chat and completions keep their PD split and their nodes regardless of ``Node.endpoints``.
SPLIT_ENDPOINTS = frozenset({Endpoint.CHAT.value, Endpoint.COMPLETIONS.value})

MODEL_PREFIX = "/v1/models/"


def route_for(route: Route, endpoint: str, path: str) -> Route:
    """The route narrowed to the hybrid nodes serving ``endpoint``; a 404 in OpenAI's shape when
    none of the model's nodes serves it."""
    if endpoint in SPLIT_ENDPOINTS:
        return route
    narrowed = route.surface.get(endpoint)
    if narrowed is None:
        raise ProxyError(
            404,
            f"No node of the model {route.name!r} serves {path} (endpoint {endpoint!r}); "
            "a node's endpoints are set in its registry entry.",
            "endpoint_not_served",
        )
    return narrowed


def model_object(snap: Snapshot, key: KeyView | None, model_id: str) -> bytes:
    """``GET /v1/models/{id}`` from RouterPanel's own list (``GET /v1/models``): OpenAI's model
    object, or a 404 ``model_not_found`` for a name it does not list to this key. Never proxied: vLLM
    has no such path."""
    route = snap.routes.get(model_id)
    if model_id not in snap.models or route is None or (key is not None and not key.allows(route)):
        raise ProxyError(404, f"The model {model_id!r} does not exist.", "model_not_found")
    body = {"id": model_id, "object": "model", "created": int(snap.built_at), "owned_by": "routerpanel"}
    return json.dumps(body).encode()
