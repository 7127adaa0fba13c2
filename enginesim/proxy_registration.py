"""Self-registration with a router, as LMDeploy's ``api_server --proxy-url URL`` does it.

Once, at start-up, before the engine listens (LMDeploy registers from its FastAPI lifespan start-up,
which uvicorn runs before it binds its socket): ``POST {URL}/nodes/add`` with the headers
``accept: application/json`` and ``Content-Type: application/json``, no credentials, and the body
``{"url": "http://{host}:{port}", "status": {"models": [served name], "role": 1|2|3}}`` (LMDeploy's
``EngineRole`` values: hybrid, prefill, decode). The URL names the bind address as given, so it
can be ``http://0.0.0.0:23333``. A failure is only logged (``Service registration failed: ...``)
and the engine serves anyway. It never calls ``/nodes/remove``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp

from enginesim.config import SimConfig

logger = logging.getLogger("enginesim.proxy_registration")

ENGINE_ROLES = {"hybrid": 1, "prefill": 2, "decode": 3}


def registration_body(config: SimConfig) -> dict[str, Any]:
    """The ``/nodes/add`` body LMDeploy's api_server sends."""
    return {
        "url": f"http://{config.host}:{config.port}",
        "status": {"models": [config.served_model_name], "role": ENGINE_ROLES[config.role]},
    }


async def register_with_proxy(config: SimConfig) -> bool:
    """Post the registration once; ``True`` when the router answered 200."""
    assert config.proxy_url
    url = config.proxy_url.rstrip("/") + "/nodes/add"
    headers = {"accept": "application/json", "Content-Type": "application/json"}
    body = json.dumps(registration_body(config))
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0), trust_env=False) as session,
            session.post(url, data=body, headers=headers) as response,
        ):
            text = await response.text()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        logger.error("Service registration failed: %s", exc)
        return False
    if response.status != 200:
        logger.error("Service registration failed: HTTP %s %s", response.status, text[:500])
        return False
    logger.info("registered with %s: %s", config.proxy_url, text[:200])
    return True
