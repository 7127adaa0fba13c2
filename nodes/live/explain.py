"""Request explanations: the record of why each proxied request went where it went, and its codec.

Each web worker keeps, per request, what its router already computed (``proxy.explain``): the
candidates with the figures the strategy read, the nodes left out and why, the pick, every attempt
with its status and timing (the PD legs included), and how the request ended. Its background loop
appends the records in batches to one capped Redis stream (``keys.EXPLAIN``, one entry per request,
trimmed by count and by age in the same call: ``APPEND_SCRIPT``); the dashboard's Requests page,
its live tail and ``/api/requests/`` read them back through ``nodes.live.explain_store``.

On the wire a record is a JSON array in the layout of the ``Wire*`` types below (version 2:
positional, and close to what the web worker holds while the request runs, so that finishing a
record is one ``orjson.dumps`` of tuples it already has: about 1.1 µs in all, measured by
``bench/explain_micro.py``, where reshaping it and packing it as MessagePack, version 1, cost 2.6 µs,
and JSON with field names ten). This module is the only place that knows the layouts, and it still
reads version 1, which a stream holds until its records age out after an upgrade. ``decode`` turns
either into the readable ``Record``, deriving what the web worker did not spend time on: the
candidates and exclusions per choice, the retries and their reasons, the time to the first byte,
and the token usage read from the slice of the answer kept for it.
"""

from __future__ import annotations

import datetime
import logging
import re
from typing import Any, TypedDict

import msgpack
import orjson

from ..choices import NodeRole, ServingMode
from . import keys

logger = logging.getLogger(__name__)

VERSION = 2  # what this code writes
VERSION_1 = 1  # MessagePack, still read

# How many candidates a choice lists with their figures (the pick first), and how many nodes it
# names per exclusion reason (the rest are counted): a route may have a thousand nodes.
LISTED_CANDIDATES = 3
NAMED_PER_REASON = 5

# -- The wire layout, version 2 (written by proxy.explain, read by decode) ---------------------

WireNode = tuple[int, str]  # node id, URL
# node id, URL, requests in flight (every worker's, as the strategy saw them), weight, the node's
# moving-average latency in seconds (0.0 before a sample), prompt characters its prefix cache is
# known to hold (prefix_cache strategy only, else None)
WireCandidate = tuple[int, str, int, int, float, int | None]
WireExclusion = tuple[str, int, list[WireNode]]  # ExclusionReason value, how many, the first few
# Nodes left out of one choice by the request's own circumstances: ExclusionReason value -> [how
# many, the first few], or None for none
WireExcluded = dict[str, list[Any]] | None
# A choice, flat: role, nodes of the role in rotation, of them available now, the model name the
# pick serves (None: no pick), the nodes left out of it (WireExcluded), then the listed candidates
# one after the other, ``CANDIDATE_WIDTH`` values each (a WireCandidate), the pick first
WireChoice = tuple[Any, ...]
CHOICE_HEAD = 5
CANDIDATE_WIDTH = 6
# role, node id, URL, seconds after the request arrived, duration in seconds, the engine's status
# (0: none), the proxy's error code for it (no answer, timeout, broken stream, client gone) or None,
# seconds to the first streamed chunk or None, the circuit breaker's verdict (True, False, None)
WireAttempt = tuple[str, int, str, float, float, int, str | None, float | None, bool | None]
# version, request id, Unix time it arrived, key name, model asked for, path, stream, serving mode,
# route policy ("" the default policy), strategy, choices, attempts, total seconds, status, error
# code, error message, the slice of the answer that holds its usage object (its bytes as Latin-1
# text, "" when none), the URL of the node whose answer the client got (None: the proxy answered
# itself), and the route's nodes out of rotation (role -> WireExclusion list, roles with none left
# out absent; None: no route), which every choice of that role left out
WireRecord = tuple[
    int,
    str,
    float,
    str | None,
    str,
    str,
    bool,
    str | None,
    str | None,
    str | None,
    tuple[WireChoice, ...],
    tuple[WireAttempt, ...],
    float,
    int,
    str | None,
    str | None,
    str,
    str | None,
    dict[str, list[WireExclusion]] | None,
]

# Version 1 differed in its choices, which the reader turns into this layout before anything else:
# role, in rotation, available, the pick (None: none was), the model name the pick serves, the
# listed candidates, every exclusion (the route's, then the request's)
_ReadChoice = tuple[str, int, int, WireNode | None, str | None, list[Any], list[Any]]

_packer = msgpack.Packer()


def encode(record: WireRecord) -> bytes:
    """The record as stored in the stream (``proxy.explain`` builds the tuple once the answer went out).

    Copied into bytes of its own size: what ``orjson.dumps`` returns keeps the whole block it wrote
    into, and the records waiting for the flush held about 4 KB each (20,000 of them 85 MB, copied
    13 MB, measured in process), which took a web worker's peak memory up by 7 MB under load."""
    return memoryview(orjson.dumps(record)).tobytes()


# What a reader looks for in the stored bytes of either version before decoding them: per text,
# its MessagePack form, then its JSON form (``encoded_texts``, ``holds``).
Needles = tuple[list[bytes], list[bytes]]


def encoded_texts(*texts: str) -> Needles:
    """How each of ``texts`` appears inside an encoded record: a reader skips a record that does not
    hold the model or key name (or request id) it looks for without decoding it."""
    return [_packer.pack(text) for text in texts], [orjson.dumps(text) for text in texts]


def holds(raw: bytes, needles: Needles) -> bool:
    """Whether the stored record ``raw`` holds every text of ``needles`` (a record may hold one
    elsewhere than in the field wanted: decoding tells)."""
    return all(needle in raw for needle in needles[raw[:1] == b"["])


# -- Appending (each web worker's loop) ----------------------------------------------------------

# KEYS[1] the stream, KEYS[2] its index of request ids; ARGV[1] the most entries kept, ARGV[2] the
# oldest entry id kept (milliseconds), ARGV[3] the batch: one MessagePack array of a request id and
# its record for each request (``append_args``). One call per batch, one argument for all of it: a
# pipeline of XADDs costs the web worker ~15 µs of CPU per record in redis-py, an argument per
# request id and record ~1.9 µs, the one array ~0.2 µs. The stream's trims are approximate (whole
# radix-tree nodes), so Redis does them in O(1) amortised; the index follows them closely enough (a
# lookup of a trimmed entry finds nothing).
APPEND_SCRIPT = """
local batch = cmsgpack.unpack(ARGV[3])
for i = 1, #batch, 2 do
  local entry = redis.call('XADD', KEYS[1], '*', 'r', batch[i + 1])
  redis.call('ZADD', KEYS[2], tonumber(string.match(entry, '^%d+')), batch[i])
end
redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', ARGV[1])
redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[1]) - 1)
return #batch / 2
"""

# Redis's Lua MessagePack reads strings, not the newer bin type: records go as strings (their
# bytes unchanged).
_batch_packer = msgpack.Packer(use_bin_type=False)


def append_args(records: list[tuple[str, bytes]], *, max_records: int, oldest_ms: int) -> list[Any]:
    """``EVAL`` arguments appending ``records`` (request id, encoded record) and trimming the stream
    and its index (see ``APPEND_SCRIPT``)."""
    batch: list[str | bytes] = []
    for request_id, payload in records:
        batch += (request_id, payload)
    return [APPEND_SCRIPT, 2, keys.EXPLAIN, keys.EXPLAIN_IDS, max_records, oldest_ms, _batch_packer.pack(batch)]


# -- The readable record -----------------------------------------------------------------------


class NodeRef(TypedDict):
    node: int
    url: str


class Candidate(TypedDict):
    node: int
    url: str
    inflight: int
    weight: int
    latency_ms: float | None  # None before the node's first sample
    prefix_match: int | None


class Exclusion(TypedDict):
    reason: str  # an ExclusionReason value
    count: int
    nodes: list[NodeRef]  # the first NAMED_PER_REASON of them


class Choice(TypedDict):
    role: str
    in_rotation: int
    available: int
    pick: NodeRef | None
    served_name: str | None
    candidates: list[Candidate]
    excluded: list[Exclusion]


class Attempt(TypedDict):
    role: str
    node: int
    url: str
    started_ms: float
    duration_ms: float
    status: int
    error: str | None
    ttft_ms: float | None
    verdict: bool | None
    retry: str | None  # for a retry: what the previous attempt of its role ended with


class Usage(TypedDict):
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None


class Pair(TypedDict):
    prefill: NodeRef | None
    decode: NodeRef | None


class Record(TypedDict):
    id: str
    entry: str  # the stream entry's id: the cursor for paging and the live tail
    at: str  # ISO 8601, UTC
    timestamp: float  # Unix time the request arrived
    key: str | None
    model: str
    path: str
    stream: bool
    mode: str | None
    policy: str | None
    strategy: str | None
    choices: list[Choice]
    attempts: list[Attempt]
    retries: int
    node: NodeRef | None  # the node whose answer the client got, else the last one tried
    pair: Pair | None  # a PD request's prefill and decode nodes
    ttfb_ms: float | None
    total_ms: float
    status: int
    error: str | None
    message: str | None
    usage: Usage | None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _node(wire: Any) -> NodeRef | None:
    return None if wire is None else NodeRef(node=int(wire[0]), url=str(wire[1]))


_USAGE_FIELD = re.compile(rb'"(prompt_tokens|completion_tokens|total_tokens)"\s*:\s*(\d+)')


def usage_counts(raw: bytes) -> tuple[int | None, int | None, int | None] | None:
    """Prompt, completion and total tokens (each None when absent; the last of a repeated one) from the
    slice of an answer that starts at its ``"usage"`` key (a JSON answer's body, a stream's usage chunk),
    or None when it holds none: one pass, no dictionary, for every answer (``budgets.token_counts``)."""
    prompt = completion = total = None
    found = False
    for name, value in _USAGE_FIELD.findall(raw):
        found = True
        if name == b"prompt_tokens":
            prompt = int(value)
        elif name == b"completion_tokens":
            completion = int(value)
        else:
            total = int(value)
    return (prompt, completion, total) if found else None


def parse_usage(raw: bytes) -> Usage | None:
    """``usage_counts`` as the readable record's ``Usage``."""
    if (counts := usage_counts(raw)) is None:
        return None
    return Usage(prompt_tokens=counts[0], completion_tokens=counts[1], total_tokens=counts[2])


def usage_slice(data: bytes) -> bytes:
    """The bytes of ``data`` from its last ``"usage"`` key on (at most 256): enough for the token
    counts, and all the buffer keeps of an answer. Cheap enough for the hot path: usage comes last
    in OpenAI's answers and chunks, so the search from the end stops early."""
    at = data.rfind(b'"usage"')
    return data[at : at + 256] if at >= 0 else b""


def _attempts(wire: list[Any]) -> tuple[list[Attempt], int]:
    attempts: list[Attempt] = []
    last_by_role: dict[str, Attempt] = {}
    retries = 0
    for role, node, url, started, duration, status, error, ttft, verdict in wire:
        previous = last_by_role.get(role)
        retry = None
        if previous is not None:
            retries += 1
            retry = previous["error"] or str(previous["status"])
        attempt = Attempt(
            role=role,
            node=int(node),
            url=url,
            started_ms=_ms(started) or 0.0,
            duration_ms=_ms(duration) or 0.0,
            status=int(status),
            error=error,
            ttft_ms=_ms(ttft),
            verdict=verdict,
            retry=retry,
        )
        attempts.append(attempt)
        last_by_role[role] = attempt
    return attempts, retries


def _choice(wire: Any) -> Choice:
    role, in_rotation, available, pick, served, candidates, excluded = wire
    return Choice(
        role=role,
        in_rotation=int(in_rotation),
        available=int(available),
        pick=_node(pick),
        served_name=served,
        candidates=[
            Candidate(
                node=int(c[0]),
                url=c[1],
                inflight=int(c[2]),
                weight=int(c[3]),
                latency_ms=_ms(c[4]) if c[4] else None,
                prefix_match=c[5],
            )
            for c in candidates
        ],
        excluded=[
            Exclusion(reason=reason, count=int(count), nodes=[NodeRef(node=int(n[0]), url=n[1]) for n in nodes])
            for reason, count, nodes in excluded
        ],
    )


def decode(raw: bytes, entry: str = "") -> Record | None:
    """The readable record from a stream entry's value, or None for one that is not a record of
    a version this code reads (a record written by a newer RouterPanel during an upgrade is
    skipped, not a 500)."""
    try:
        wire = orjson.loads(raw) if raw[:1] == b"[" else msgpack.unpackb(raw, raw=False)
    except Exception:  # any malformed value: msgpack raises several exception types
        return None
    if not isinstance(wire, list) or len(wire) < 18 or wire[0] not in (VERSION, VERSION_1):
        return None
    try:
        if wire[0] == VERSION:
            wire = [*wire[:10], _read_choices(wire[10], wire[18]), *wire[11:16], wire[16].encode("latin-1"), wire[17]]
        return _decode(wire, entry)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
        logger.debug("skipping a malformed request explanation %s: %s", entry, exc)
        return None


def _read_choices(choices: list[list[Any]], route_excluded: dict[str, list[Any]] | None) -> list[_ReadChoice]:
    """Version 2's flat choices in the reader's layout (version 1's): the candidates apart, and the
    route's exclusions of the choice's role before the request's own."""
    result: list[_ReadChoice] = []
    for choice in choices:
        role, in_rotation, available, served, excluded = choice[:CHOICE_HEAD]
        candidates = [choice[at : at + CANDIDATE_WIDTH] for at in range(CHOICE_HEAD, len(choice), CANDIDATE_WIDTH)]
        pick = (candidates[0][0], candidates[0][1]) if served is not None else None
        exclusions = list(route_excluded.get(role, ())) if route_excluded else []
        if excluded:
            exclusions += [(reason, count, named) for reason, (count, named) in excluded.items()]
        result.append((role, in_rotation, available, pick, served, candidates, exclusions))
    return result


def _decode(wire: list[Any], entry: str) -> Record:
    _, request_id, at, key, model, path, stream, mode, policy, strategy, choices, attempts_wire = wire[:12]
    total, status, error, message, usage, answered_by = wire[12:18]
    attempts, retries = _attempts(attempts_wire)
    ttfb: float | None = None
    delivering = next((a for a in reversed(attempts) if a["ttft_ms"] is not None), None)
    if stream and delivering is not None:
        ttfb = round(delivering["started_ms"] + (delivering["ttft_ms"] or 0.0), 3)
    elif status:
        ttfb = _ms(total)  # an answer sent in one piece: its first byte went out with the rest
    answered = [a for a in attempts if a["url"] == answered_by] if answered_by else []
    last = answered[-1] if answered else attempts[-1] if attempts else None
    pair: Pair | None = None
    if mode == ServingMode.PD:
        legs = {attempt["role"]: attempt for attempt in attempts}  # the last attempt of each leg
        picks = {c[0]: _node(c[3]) for c in choices if c[3] is not None}

        def leg(role: str) -> NodeRef | None:
            tried = legs.get(role)
            return NodeRef(node=tried["node"], url=tried["url"]) if tried else picks.get(role)

        pair = Pair(prefill=leg(NodeRole.PREFILL), decode=leg(NodeRole.DECODE))
    return Record(
        id=request_id,
        entry=entry,
        at=datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="milliseconds"),
        timestamp=float(at),
        key=key,
        model=model,
        path=path,
        stream=bool(stream),
        mode=mode,
        policy=policy,
        strategy=strategy,
        choices=[_choice(c) for c in choices],
        attempts=attempts,
        retries=retries,
        node=NodeRef(node=last["node"], url=last["url"]) if last else None,
        pair=pair,
        ttfb_ms=ttfb,
        total_ms=_ms(total) or 0.0,
        status=int(status),
        error=error,
        message=message,
        usage=parse_usage(usage) if isinstance(usage, bytes) else None,
    )
