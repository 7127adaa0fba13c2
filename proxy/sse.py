"""Server-sent events: response headers for a passed-through stream and the end-of-stream error."""

from __future__ import annotations

from .errors import ProxyError
from .transport import NOSNIFF

# Never buffered or compressed by a reverse proxy in front of us (nginx honours X-Accel-Buffering),
# never sniffed by a browser.
STREAM_HEADERS: list[tuple[bytes, bytes]] = [
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    NOSNIFF,
]

DONE = b"data: [DONE]\n\n"


def error_event(error: ProxyError, *, after: bytes = b"") -> bytes:
    """A ``data:`` event carrying ``error`` in OpenAI shape, then ``[DONE]``.

    ``after`` is the last chunk already sent: if it stopped inside an event, the event is closed
    first so the error arrives as an event of its own.
    """
    prefix = b"" if not after or after.endswith(b"\n\n") else (b"\n" if after.endswith(b"\n") else b"\n\n")
    return prefix + error.sse_bytes()
