"""The channel layer's settings for tests: the project's own options, on another Redis."""

from __future__ import annotations


def channel_layers_at(layers: dict, redis_url: str) -> dict:
    """``CHANNEL_LAYERS`` with the project's options for its Redis, on ``redis_url``."""
    layer = layers["default"]
    (host,) = layer["CONFIG"]["hosts"]
    host = {**host, "address": redis_url} if isinstance(host, dict) else redis_url
    return {"default": {**layer, "CONFIG": {**layer["CONFIG"], "hosts": [host]}}}
