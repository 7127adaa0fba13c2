"""Reading the request explanations back (``keys.EXPLAIN``; the record is ``nodes.live.explain``'s).

The stream's entries are in the order the web workers flushed them, newest last, and their ids are
Redis's clock in milliseconds. A page walks it from the newest entry (or from a cursor: the last
entry id of the previous page) backwards in chunks, keeping the records that match the filter;
the live tail reads what came after the last entry it saw. Nothing here writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from . import keys
from .explain import Needles, Record, decode, encoded_texts, holds

# Entries read per round trip while paging, and the most one page walks (about a tenth of a second
# of decoding): a filter that matches rarely returns a shorter page with a cursor to go on from,
# rather than reading the whole stream in one call.
CHUNK = 500
MAX_SCAN = 20_000
# A record's ``timestamp`` is when the request arrived, on its web worker's clock; its entry's id
# is when it was flushed, on Redis's. The entry is always later, but allow for hosts' clocks
# being this far apart when a time range narrows the part of the stream read.
CLOCK_SLACK_MS = 60_000

STATUS_CLASSES = {"1xx", "2xx", "3xx", "4xx", "5xx", "error"}


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """Which records a reader wants; every field None means any."""

    model: str | None = None
    node: int | None = None  # the node was picked for it or tried
    key: str | None = None  # the API key's name
    status: str | None = None  # an HTTP status ("503"), a class ("5xx") or "error" (4xx, 5xx, or an error code)
    since: float | None = None  # Unix time, inclusive
    until: float | None = None  # Unix time, inclusive

    def matches(self, record: Record) -> bool:
        if self.model is not None and record["model"] != self.model:
            return False
        if self.key is not None and record["key"] != self.key:
            return False
        if self.since is not None and record["timestamp"] < self.since:
            return False
        if self.until is not None and record["timestamp"] > self.until:
            return False
        if self.status is not None and not _status_matches(self.status, record):
            return False
        return self.node is None or _involves(record, self.node)

    def needles(self) -> Needles:
        """Bytes every matching record's encoding holds (see ``explain.encoded_texts``)."""
        return encoded_texts(*(text for text in (self.model, self.key) if text is not None))

    def lowest_entry(self) -> str:
        """The oldest entry id that can hold a matching record ("-" for the whole stream)."""
        if self.since is None:
            return "-"
        return str(max(0, math.floor(self.since * 1000) - CLOCK_SLACK_MS))


def _status_matches(wanted: str, record: Record) -> bool:
    status = record["status"]
    if wanted == "error":
        return status >= 400 or status == 0 or record["error"] is not None
    if wanted in STATUS_CLASSES:
        return str(status)[:1] == wanted[0]
    return str(status) == wanted


def _involves(record: Record, node: int) -> bool:
    if any(attempt["node"] == node for attempt in record["attempts"]):
        return True
    return any(choice["pick"] is not None and choice["pick"]["node"] == node for choice in record["choices"])


def _entries(raw: Any) -> list[tuple[str, bytes]]:
    """(entry id, record bytes) from an XRANGE/XREVRANGE reply."""
    result = []
    for entry_id, fields in raw or ():
        value = fields.get(b"r") if b"r" in fields else fields.get("r")
        if value is not None:
            result.append((entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id), value))
    return result


@dataclass(frozen=True, slots=True)
class Page:
    records: list[Record]
    cursor: str | None  # pass as ``before`` for the next (older) page; None when there is none


def read_page(
    client: redis.Redis, wanted: RequestFilter, *, before: str | None = None, limit: int = 50, scan: int = MAX_SCAN
) -> Page:
    """The newest ``limit`` records matching ``wanted``, older than the entry ``before`` if given
    (a stream entry id, ``<ms>-<seq>``)."""
    if before == "0-0":  # nothing is older than the first possible entry
        return Page([], None)
    high = f"({before}" if before else "+"
    low = wanted.lowest_entry()
    records: list[Record] = []
    needles = wanted.needles()
    scanned = 0
    while scanned < scan:
        chunk = _entries(client.xrevrange(keys.EXPLAIN, max=high, min=low, count=CHUNK))
        for entry_id, value in chunk:
            if not holds(value, needles):
                continue
            record = decode(value, entry_id)
            if record is not None and wanted.matches(record):
                records.append(record)
                if len(records) == limit:
                    return Page(records, entry_id)
        scanned += len(chunk)
        if len(chunk) < CHUNK:
            return Page(records, None)
        high = f"({chunk[-1][0]}"
    return Page(records, high[1:])


def find(client: redis.Redis, request_id: str) -> Record | None:
    """The newest record of ``request_id`` (clients may reuse an ``X-Request-Id``), or None: the
    index gives its entry's millisecond, which holds a handful of entries at most."""
    millisecond = client.zscore(keys.EXPLAIN_IDS, request_id)
    if millisecond is None:
        return None
    needles = encoded_texts(request_id)
    entries = _entries(client.xrevrange(keys.EXPLAIN, max=str(int(millisecond)), min=str(int(millisecond))))
    for entry_id, value in entries:
        if holds(value, needles):  # a byte search first: decoding every record would cost more
            record = decode(value, entry_id)
            if record is not None and record["id"] == request_id:
                return record
    return None


async def newest_entry(client: aioredis.Redis) -> str:
    """The newest entry's id, or "0" for an empty stream: where a live tail starts."""
    entries = _entries(await client.xrevrange(keys.EXPLAIN, count=1))
    return entries[0][0] if entries else "0"


def newest_entry_sync(client: redis.Redis) -> str:
    """``newest_entry`` for blocking callers."""
    entries = _entries(client.xrevrange(keys.EXPLAIN, count=1))
    return entries[0][0] if entries else "0"


async def read_after(
    client: aioredis.Redis, after: str, wanted: RequestFilter, *, count: int = CHUNK
) -> tuple[list[Record], str, bool]:
    """The records after the entry ``after`` that match ``wanted`` (oldest first), the id of the
    last entry read (where the next call starts), and whether some were passed over: when more than
    ``count`` entries arrived since, a live tail jumps to the newest ``count`` instead of lagging."""
    entries = _entries(await client.xrange(keys.EXPLAIN, min=f"({after}", max="+", count=count))
    skipped = False
    if len(entries) == count:
        newest = _entries(await client.xrevrange(keys.EXPLAIN, count=count))
        skipped = bool(newest) and newest[-1][0] != entries[0][0]
        entries = list(reversed(newest))
    if not entries:
        return [], after, False
    records = [r for entry_id, value in entries if (r := decode(value, entry_id)) is not None and wanted.matches(r)]
    return records, entries[-1][0], skipped
