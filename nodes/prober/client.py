"""The prober's HTTP client: one aiohttp session with pooled keep-alive connections, and one probe.

A probe is ``GET {node}/health`` answered 200 within the node's timeout. Keep-alive makes a probe a
few hundred microseconds of CPU instead of a connection set-up and tear-down each time. The price
is the keep-alive race: a server may close an idle connection just as the prober reuses it (uvicorn,
vLLM's server, closes idle connections after 5 s), which looks like a reset. Such a failure on a
reused connection is retried once on a fresh one within the same timeout, so only a node that also
refuses the fresh connection fails.
"""

from __future__ import annotations

import asyncio
import errno

import aiohttp

from .verdicts import CONNECT, GOOD, HTTP_STATUS, OWN, TIMEOUT

# The prober's own resources ran out: says nothing about the node.
_OWN_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})
# A kept-alive connection the server had closed.
_STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


class CountingConnector(aiohttp.TCPConnector):
    """aiohttp's connector, counting the connections it opens (keep-alive working means few)."""

    opened = 0

    async def _create_connection(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        self.opened += 1
        return await super()._create_connection(*args, **kwargs)  # type: ignore[arg-type]


def new_session(*, limit: int, keepalive: float) -> aiohttp.ClientSession:
    """The prober's one session: up to ``limit`` connections, idle ones kept ``keepalive`` seconds
    (longer than the longest probe interval, so each node keeps its connection between probes)."""
    connector = CountingConnector(limit=limit, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=keepalive)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        headers={"User-Agent": "routerpanel-prober"},
        timeout=aiohttp.ClientTimeout(total=None),
        raise_for_status=False,
    )


def _errno(exc: BaseException) -> int | None:
    os_error = getattr(exc, "os_error", None)
    for candidate in (exc, os_error, exc.__cause__):
        number = getattr(candidate, "errno", None)
        if isinstance(number, int):
            return number
    return None


def _describe(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}"[:300]


async def probe(session: aiohttp.ClientSession, url: str, timeout: float) -> tuple[str, str, float | None]:
    """Probe ``url`` (the node's health URL): ``(kind, detail, latency in ms)``, where kind is one of
    ``nodes.prober.verdicts``' result kinds. Never raises (but for cancellation)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout_at(started + timeout):
            try:
                status = await _get(session, url)
            except _STALE as exc:
                if _errno(exc) in _OWN_ERRNOS:
                    raise
                status = await _get(session, url)  # the keep-alive race: once more on a fresh connection
    except TimeoutError:
        return TIMEOUT, f"no answer within {timeout:g} s", None
    except (aiohttp.ClientError, OSError) as exc:
        return (OWN if _errno(exc) in _OWN_ERRNOS else CONNECT), _describe(exc), None
    latency = (loop.time() - started) * 1000
    if status == 200:
        return GOOD, "OK", latency
    return HTTP_STATUS, f"HTTP {status}", latency


async def _get(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url, allow_redirects=False) as response:
        await response.read()
        return response.status
