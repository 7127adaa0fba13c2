"""Calls from one simulated engine to its PD peer (the decode reading KV from the prefill)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

_sessions: dict[int, aiohttp.ClientSession] = {}


def _session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    session = _sessions.get(id(loop))
    if session is None or session.closed:
        session = aiohttp.ClientSession(trust_env=False)
        _sessions[id(loop)] = session
    return session


async def post_json(url: str, body: dict[str, Any], *, timeout: float) -> tuple[int, Any]:
    """POST JSON to a peer; returns (status, parsed body or text), or (0, the reason) when the peer
    did not answer (connection refused, timeout), which every caller treats as a failed call."""
    try:
        async with _session().post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = await resp.text()
            return resp.status, data
    except (aiohttp.ClientError, OSError) as exc:
        return 0, f"{url}: {exc.__class__.__name__}: {exc}"


async def close_sessions() -> None:
    for session in list(_sessions.values()):
        await session.close()
    _sessions.clear()
