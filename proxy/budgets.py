"""API keys' token budgets (tokens per minute and per UTC day), enforced across every web worker.

A request is admitted while its key's use in the current windows is under its budgets; the tokens
it used are counted when it ends, from the engine's ``usage`` (``Outcome.usage``). So a budget is
enforced from the request after the one that crosses it, and across workers a key may overshoot by
what the others counted within one turn of their loops (docs/usage.md).

The hot path only reads and adds to dicts: ``exceeded`` when a budgeted key's request arrives,
``add`` (from ``proxy.accounting``) when a key's request ends with usage. The worker's loop (``proxy.shared``) adds the
counts to Redis and reads the totals back in the round trip it makes anyway
(``nodes.live.budgets``).
"""

from __future__ import annotations

import time
from typing import Any

from nodes.live import budgets as live

from .snapshot import KeyView, Snapshot

_Counts = dict[tuple[int, int], int]  # (key id, window) -> tokens


def _merge(into: _Counts, counts: _Counts) -> None:
    for field, tokens in counts.items():
        into[field] = into.get(field, 0) + tokens


class TokenBudgets:
    """This worker's token counts: its own since the last flush, exactly, plus every worker's
    totals as of the last flush (which include this worker's flushed counts)."""

    def __init__(self) -> None:
        self.minute: _Counts = {}  # not yet flushed
        self.day: _Counts = {}
        self._sending: tuple[_Counts, _Counts] = ({}, {})  # taken by a flush still on its way
        self.totals_at = (-1, -1)  # the (minute, day) of the totals below
        self.minute_totals: dict[int, int] = {}  # key id -> every worker's tokens in that minute
        self.day_totals: dict[int, int] = {}
        self._budgeted: tuple[Snapshot | None, list[int]] = (None, [])

    # -- The hot path ---------------------------------------------------------------------------

    def add(self, key_id: int, tokens: int, now: float) -> None:
        """Count ``tokens`` (prompt + completion) that a request of ``key_id`` used."""
        field = (key_id, live.minute_of(now))
        self.minute[field] = self.minute.get(field, 0) + tokens
        field = (key_id, live.day_of(now))
        self.day[field] = self.day.get(field, 0) + tokens

    def record(self, key_id: int, usage: bytes, now: float | None = None) -> int:
        """Count the tokens of an answer's ``usage`` bytes for ``key_id``; returns them."""
        tokens = live.tokens_in(usage)
        if tokens:
            self.add(key_id, tokens, time.time() if now is None else now)
        return tokens

    def used(self, key_id: int, now: float) -> tuple[int, int]:
        """Tokens of ``key_id`` in the current minute and day, every worker's."""
        minute, day = live.minute_of(now), live.day_of(now)
        sending_minute, sending_day = self._sending
        at_minute, at_day = self.totals_at
        field = (key_id, minute)
        in_minute = (
            (self.minute_totals.get(key_id, 0) if at_minute == minute else 0)
            + self.minute.get(field, 0)
            + sending_minute.get(field, 0)
        )
        field = (key_id, day)
        in_day = (
            (self.day_totals.get(key_id, 0) if at_day == day else 0)
            + self.day.get(field, 0)
            + sending_day.get(field, 0)
        )
        return in_minute, in_day

    def exceeded(self, key: KeyView, now: float | None = None) -> tuple[str, int] | None:
        """The budget ``key`` has used up (``tokens_per_minute`` or ``tokens_per_day``) and the
        seconds until its window frees, or None. When both are used up, the later one."""
        now = time.time() if now is None else now
        in_minute, in_day = self.used(key.id, now)
        if key.tokens_per_day is not None and in_day >= key.tokens_per_day:
            return "tokens_per_day", live.seconds_left(now, live.DAY)
        if key.tokens_per_minute is not None and in_minute >= key.tokens_per_minute:
            return "tokens_per_minute", live.seconds_left(now, live.MINUTE)
        return None

    # -- The worker's loop ----------------------------------------------------------------------

    def budgeted(self, snap: Snapshot) -> list[int]:
        """The ids of the keys with a budget (worked out once per snapshot)."""
        cached, ids = self._budgeted
        if cached is not snap:
            ids = sorted(k.id for k in snap.keys.values() if k.tokens_per_minute or k.tokens_per_day)
            self._budgeted = (snap, ids)
        return ids

    def queue_flush(self, pipe: Any, key_ids: list[int], now: float) -> tuple[int, int]:
        """Queue adding this worker's counts and reading the budgeted keys' totals; returns the
        windows read. ``flushed`` (or ``failed``) must follow the pipeline's execution."""
        self._sending = (self.minute, self.day)
        self.minute, self.day = {}, {}
        live.queue_add(pipe, *self._sending)
        windows = live.minute_of(now), live.day_of(now)
        if key_ids:
            live.queue_read(pipe, *windows, key_ids)
        return windows

    def flushed(self, windows: tuple[int, int], key_ids: list[int], results: list[Any]) -> None:
        """Adopt the totals read (the last two results of what ``queue_flush`` queued)."""
        self._sending = ({}, {})
        if key_ids:
            self.minute_totals = live.decode_totals(key_ids, results[-2])
            self.day_totals = live.decode_totals(key_ids, results[-1])
        else:
            self.minute_totals, self.day_totals = {}, {}
        self.totals_at = windows

    def failed(self) -> None:
        """The flush did not reach Redis: its counts wait for the next one."""
        _merge(self.minute, self._sending[0])
        _merge(self.day, self._sending[1])
        self._sending = ({}, {})

    def forget_before(self, now: float) -> None:
        """Drop counts of windows already over (a worker whose counters are not shared never
        flushes them)."""
        minute, day = live.minute_of(now), live.day_of(now)
        self.minute = {field: n for field, n in self.minute.items() if field[1] >= minute}
        self.day = {field: n for field, n in self.day.items() if field[1] >= day}
