"""Taking a stream's usage from the engine when the client did not ask for it.

Token budgets and usage accounting need every answer's token counts (docs/usage.md). A JSON answer
carries them; a stream only when the client sent ``stream_options.include_usage``. For the others
the hybrid path asks the engine for them (``with_usage``) and ``TakenUsage`` takes the usage chunk
out of what the client receives, so the client gets exactly the bytes it would have got.

Only where that is known to be exact: a vLLM node (``engine_type`` vllm), chat or completions, one
choice (``n`` absent or 1) and no ``stream_options`` of the client's own (``continuous_usage_stats``
would put usage in every chunk). What vLLM changes when asked for usage, with continuous usage off
(its ``serving.py`` for chat and completions, checked byte for byte in
``tests/realengines/test_stream_usage_vllm.py``):

- one more event before ``data: [DONE]``: ``choices: []`` with ``usage`` (and ``system_fingerprint``);
- the chunk that carries ``finish_reason`` loses its ``system_fingerprint``, which vLLM puts there only
  when no usage chunk follows. It is put back, from the usage chunk, as the chunk's last field.

No other chunk changes (vLLM leaves ``usage`` out of the JSON when unset). The relay pays one
``bytes.find`` per chunk until the one that carries a ``finish_reason``; from there to the end of
the stream (that chunk, the usage chunk and ``[DONE]``, sent back to back by the engine) the bytes
are held and rewritten once.
"""

from __future__ import annotations

from nodes.choices import EngineType

from .request import ProxyRequest

STREAM_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
FINISH = b'"finish_reason":"'  # a chunk that ends a choice (running chunks have ``null``)
_SPLIT = len(FINISH) - 1  # bytes of one chunk kept to find FINISH across two
_FINGERPRINT = b'"system_fingerprint":'
ASK = b',"stream_options":{"include_usage":true}}'


def takes_usage(request: ProxyRequest, engine_type: str) -> bool:
    """Whether to ask this node for a usage chunk the client did not ask for (see module doc)."""
    if not request.stream or engine_type != EngineType.VLLM or request.path not in STREAM_PATHS:
        return False
    payload = request.payload
    return "stream_options" not in payload and payload.get("n", 1) in (1, None)


def with_usage(body: bytes) -> bytes:
    """``body`` (a JSON object without ``stream_options``) asking for the usage chunk: the field is
    added before the closing brace, every other byte kept."""
    end = body.rstrip().rfind(b"}")
    return body[:end] + ASK + body[end + 1 :]


class TakenUsage:
    """One stream's relay hook: ``feed`` each chunk and send what it returns; ``finish`` at the end
    gives the held bytes to send. ``usage`` is then the usage event taken out (b"" when none)."""

    __slots__ = ("held", "mark", "tail", "usage")

    def __init__(self) -> None:
        self.tail = b""  # the last bytes sent when they end inside an event, to find FINISH split over two
        self.held: list[bytes] | None = None
        self.mark = 0  # where FINISH ends in the held bytes (at least 0)
        self.usage = b""

    def feed(self, chunk: bytes) -> bytes:
        held = self.held
        if held is not None:
            held.append(chunk)
            return b""
        at = chunk.find(FINISH)
        if at >= 0:
            at += len(FINISH)
        elif self.tail and FINISH in self.tail + chunk[:_SPLIT]:
            at = 0  # FINISH ends in this chunk, with no event boundary before it
        else:
            # An engine writes whole events, so a read mostly ends at an event's end, where FINISH
            # cannot straddle it; otherwise keep the read's last bytes to look across.
            if chunk.endswith(b"\n\n"):
                self.tail = b""
            else:
                self.tail = chunk[-_SPLIT:] if len(chunk) >= _SPLIT else (self.tail + chunk)[-_SPLIT:]
            return chunk
        self.held = [chunk]
        self.mark = at
        return b""

    def finish(self) -> bytes:
        """The held end of the stream without the usage event, the fingerprint put back."""
        if self.held is None:
            return b""
        data = b"".join(self.held)
        self.held = None
        end = data.find(b"\n\n", self.mark)
        if end < 0 or b'"usage"' in data[self.mark : end]:
            # The stream broke off inside the last chunk, or the engine puts usage in every chunk
            # whatever the request says (vLLM's --enable-force-include-usage): a client that did
            # not ask gets the usage chunk too, so nothing is taken.
            return data
        events = data[end + 2 :].split(b"\n\n")
        for i, event in enumerate(events):
            if event.startswith(b"data: {") and b'"choices":[]' in event and b'"usage":{' in event:
                self.usage = event
                del events[i]
                break
        else:
            return data
        head = data[:end]
        fingerprint = _field(self.usage, _FINGERPRINT)
        if fingerprint is not None and head.endswith(b"}") and _FINGERPRINT not in head[self.mark :]:
            head = head[:-1] + b"," + _FINGERPRINT + fingerprint + b"}"
        return head + b"\n\n" + b"\n\n".join(events)


def _field(event: bytes, name: bytes) -> bytes | None:
    """The raw JSON string value of ``name`` in ``event`` (quotes included), or None."""
    at = event.find(name)
    if at < 0 or event[at + len(name) : at + len(name) + 1] != b'"':
        return None
    start = at + len(name)
    close = event.find(b'"', start + 1)
    while close > 0 and event[close - 1 : close] == b"\\":
        close = event.find(b'"', close + 1)
    return event[start : close + 1] if close > 0 else None
