"""Taking a stream's usage from the engine when the client did not ask for it.

Token budgets and usage accounting need every answer's token counts (docs/usage.md). A JSON answer
carries them; a stream only when the client sent ``stream_options.include_usage``. For the others
the hybrid path and the PD decode ask the engine for them (``with_usage``) and ``TakenUsage`` takes
the usage chunk out of what the client receives, so the client gets exactly the bytes it would have
got.

Only where that is known to be exact: chat or completions, one choice (``n`` absent or 1), no
``stream_options`` of the client's own (``continuous_usage_stats`` would put usage in every chunk),
and an engine whose stream, asked for usage, changes only in ways ``Shape`` undoes (read in each
engine's own serving code; docs/usage.md lists them):

- every one sends one more event before ``data: [DONE]``: ``choices: []`` with ``usage``;
- vLLM also moves ``system_fingerprint`` from the chunk that carries ``finish_reason`` to that
  event; it is put back, from the usage chunk, as the chunk's last field;
- LMDeploy also adds ``"usage": null`` as the last field of every other chunk; it is taken out.

The relay pays one ``bytes.find`` per chunk until the one that carries a ``finish_reason`` (LMDeploy:
and one ``bytes.replace``); from there to the end of the stream (that chunk, the usage chunk and
``[DONE]``, sent back to back by the engine) the bytes are held and rewritten once.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodes.choices import EngineType

from .request import ProxyRequest, with_members

STREAM_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_FINGERPRINT = b'"system_fingerprint":'
ASK = b'"stream_options":{"include_usage":true}'
_USAGE_EVENT_MARKS = ((b'"choices":[]', b'"usage":{'), (b'"choices": []', b'"usage": {'))


@dataclass(frozen=True, slots=True)
class Shape:
    """How an engine's stream differs when it was asked for usage (besides the usage event)."""

    finish: bytes  # how a chunk that ends a choice starts its finish reason (running chunks have null)
    fingerprint: bool = False  # vLLM: system_fingerprint moves from that chunk to the usage event
    null_usage: bytes = b""  # LMDeploy: every other event ends with this instead of ``}``


_COMPACT = b'"finish_reason":"'  # pydantic's and msgspec's JSON (vLLM, SGLang)
_SPACED = b'"finish_reason": "'  # Python's json.dumps (LMDeploy, DLEngine)
SHAPES: dict[str, Shape] = {
    EngineType.VLLM: Shape(_COMPACT, fingerprint=True),
    EngineType.SGLANG: Shape(_COMPACT),
    EngineType.LMDEPLOY: Shape(_SPACED, null_usage=b', "usage": null}\n\n'),
    EngineType.NANODEPLOY: Shape(_SPACED),
}


def takes_usage(request: ProxyRequest, engine_type: str) -> Shape | None:
    """How to take a usage chunk the client did not ask for from this node's stream, or None when
    it is not asked for (see module doc)."""
    if not request.stream or request.path not in STREAM_PATHS:
        return None
    shape = SHAPES.get(engine_type)
    if shape is None:
        return None
    payload = request.payload
    return shape if "stream_options" not in payload and payload.get("n", 1) in (1, None) else None


def with_usage(body: bytes) -> bytes:
    """``body`` (a JSON object without ``stream_options``) asking for the usage chunk: the field is
    added before the closing brace, every other byte kept."""
    return with_members(body, ASK)


def _has_usage(data: bytes) -> bool:
    # ``find``, not ``in``: see ``_head`` in routerpanel.proxylane (bytes' ``in`` costs an exception).
    return data.find(b'"usage":{') >= 0 or data.find(b'"usage": {') >= 0


class TakenUsage:
    """One stream's relay hook: ``feed`` each chunk and send what it returns; ``finish`` at the end
    gives the held bytes to send. ``usage`` is then the usage event taken out (b"" when none)."""

    __slots__ = ("finish_mark", "held", "mark", "null_usage", "partial", "shape", "split", "tail", "usage")

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.finish_mark = shape.finish
        self.split = len(shape.finish) - 1  # bytes of one chunk kept to find the mark across two
        self.null_usage = shape.null_usage
        self.tail = b""  # the last bytes sent when they end inside an event, to find the mark split over two
        self.partial = b""  # LMDeploy: the start of an event not yet whole, held until it is
        self.held: list[bytes] | None = None
        self.mark = 0  # where the finish mark ends in the held bytes (at least 0)
        self.usage = b""

    def feed(self, chunk: bytes) -> bytes:
        held = self.held
        if held is not None:
            held.append(chunk)
            return b""
        at = chunk.find(self.finish_mark)
        if at >= 0:
            at += len(self.finish_mark)
        elif self.tail and self.finish_mark in self.tail + chunk[: self.split]:
            at = 0  # the mark ends in this chunk, with no event boundary before it
        else:
            # An engine writes whole events, so a read mostly ends at an event's end, where the mark
            # cannot straddle it; otherwise keep the read's last bytes to look across.
            if chunk.endswith(b"\n\n"):
                self.tail = b""
            else:
                split = self.split
                self.tail = chunk[-split:] if len(chunk) >= split else (self.tail + chunk)[-split:]
            return chunk
        self.held = [chunk]
        self.mark = at
        return b""

    def finish(self) -> bytes:
        """The held end of the stream without the usage event, the engine's other changes undone."""
        if self.held is None:
            return self.partial
        data = b"".join(self.held)
        self.held = None
        if self.null_usage:  # whole events were held from the one with the finish mark on
            data = data.replace(self.null_usage, b"}\n\n")
            self.mark = data.find(self.finish_mark) + len(self.finish_mark)
        end = data.find(b"\n\n", self.mark)
        if end < 0 or _has_usage(data[self.mark : end]):
            # The stream broke off inside the last chunk, or the engine puts usage in every chunk
            # whatever the request says (vLLM's --enable-force-include-usage): a client that did
            # not ask gets the usage chunk too, so nothing is taken.
            return data
        events = data[end + 2 :].split(b"\n\n")
        for i, event in enumerate(events):
            if event.startswith(b"data: {") and any(c in event and u in event for c, u in _USAGE_EVENT_MARKS):
                self.usage = event
                del events[i]
                break
        else:
            return data
        head = data[:end]
        if self.shape.fingerprint:
            fingerprint = _field(self.usage, _FINGERPRINT)
            if fingerprint is not None and head.endswith(b"}") and head.find(_FINGERPRINT, self.mark) < 0:
                head = head[:-1] + b"," + _FINGERPRINT + fingerprint + b"}"
        return head + b"\n\n" + b"\n\n".join(events)


class TakenEvents(TakenUsage):
    """``TakenUsage`` for an engine that also changes every other chunk (``Shape.null_usage``):
    it passes whole events only (a read that ends inside one keeps its start for the next), each
    without the null usage the engine added."""

    __slots__ = ()

    def feed(self, chunk: bytes) -> bytes:
        held = self.held
        if held is not None:
            held.append(chunk)
            return b""
        if self.partial:
            chunk = self.partial + chunk
            self.partial = b""
        at = chunk.find(self.finish_mark)
        if at >= 0:
            self.held = [chunk]
            self.mark = at + len(self.finish_mark)
            return b""
        if not chunk.endswith(b"\n\n"):
            end = chunk.rfind(b"\n\n")
            end = 0 if end < 0 else end + 2
            chunk, self.partial = chunk[:end], chunk[end:]
        return chunk.replace(self.null_usage, b"}\n\n")


def taken_usage(shape: Shape) -> TakenUsage:
    """The relay hook for a stream of this shape."""
    return TakenEvents(shape) if shape.null_usage else TakenUsage(shape)


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
