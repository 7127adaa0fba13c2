"""Relaying an engine's SSE stream to the client, for the hybrid path and the PD decode leg.

The bytes pass through as they arrive (a PD decode's usage event is rewritten on the way by the
caller's ``transform``); if the engine fails after the stream started, it ends with an
OpenAI-shaped error event and ``[DONE]``, since the status line has already been sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp

from . import sse
from .attempts import SSE, Attempt, Names
from .errors import ProxyError, engine_failed, engine_timeout
from .request import Outcome
from .transport import DisconnectWatcher, Send
from .usage import TakenUsage

# How far from the end of a read the usage chunk's ``"usage"`` key can be: the rest of that chunk
# (its usage object ends it) and ``[DONE]``, a few hundred bytes.
USAGE_WITHIN = 4096


def _usage_at_end(chunk: bytes) -> bytes:
    """``chunk`` from its last ``"usage"`` key on, when that key is near its end (b"" otherwise).

    The search is bounded: a stream read in a few large pieces (a fast engine sends all of it at
    once) would otherwise be searched whole for a key that is not there when nobody asked for
    usage, three times per stream (here, for the token counts and for the explanation), about
    14 µs for a 64-token stream."""
    at = chunk.rfind(b'"usage"', max(0, len(chunk) - USAGE_WITHIN))
    return chunk[at:] if at >= 0 else b""


async def relay_stream(
    send: Send,
    attempt: Attempt,
    headers: list[tuple[bytes, bytes]],
    watcher: DisconnectWatcher,
    outcome: Outcome,
    names: Names,
    transform: Callable[[bytes], bytes] | None = None,
    taken: TakenUsage | None = None,
) -> bool:
    """Send the stream of ``attempt`` (its first chunk already read) with ``headers`` added.

    ``taken``: the engine was asked for a usage chunk the client did not ask for, which is taken
    out on the way (``proxy.usage``). Returns True when the engine ended the stream, False when it
    broke off (a failure of the node). Sets the outcome's status, time to first token, mean gap
    between chunks and usage."""
    response = attempt.response
    assert response is not None
    content_type = response.header(b"content-type", SSE.encode())
    headers = [(b"content-type", content_type), *sse.STREAM_HEADERS, *headers]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    outcome.status = 200
    first_at = last_at = time.perf_counter()
    last = previous = attempt.first
    complete = True
    error: ProxyError | None = None
    try:
        if last:
            outcome.ttft = attempt.ttft = first_at - attempt.started
            if transform is not None:
                last = transform(last)
            out = last if taken is None else taken.feed(last)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
            content = response.content
            while chunk := await content.readany():  # (a plain loop: no async generator per stream)
                previous = last
                last = chunk if transform is None else transform(chunk)
                out = last if taken is None else taken.feed(last)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            last_at = time.perf_counter()
    except (aiohttp.ClientError, TimeoutError) as exc:
        complete = False
        if isinstance(exc, TimeoutError):
            message = f"{names.node} {attempt.url} did not finish the stream within the policy's timeout."
            error = engine_timeout(message)
        else:
            error = engine_failed(f"{names.node} {attempt.url} failed mid-stream: {exc}", names.stream_error)
        outcome.error = error.code
    if taken is not None:
        held = taken.finish()
        if held:
            await send({"type": "http.response.body", "body": held, "more_body": True})
            last = held
    if error is not None:
        await send({"type": "http.response.body", "body": sse.error_event(error, after=last), "more_body": True})
    # A read may hold several of the engine's chunks (its events): the gap is between those, and
    # known only for a stream that ended (a broken one has no last chunk's time).
    chunks = response.parts
    if complete and chunks > 1:
        outcome.mean_gap = (last_at - first_at) / (chunks - 1)
    # The usage chunk (when the client asked for one) comes last, perhaps read together with
    # ``[DONE]``, perhaps just before it.
    if taken is not None and taken.usage:
        outcome.usage = taken.usage
    else:  # (a stream read whole in its first chunk has no previous one: that chunk is searched once)
        outcome.usage = _usage_at_end(last) or (b"" if previous is last else _usage_at_end(previous))
    watcher.finish()
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return complete
