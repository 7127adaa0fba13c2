"""The KV ledger: which sequences hold KV blocks on a prefill engine, and every free attempt."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from enginesim.shapes import KvLedgerSnapshot


@dataclass
class KvEntry:
    key: int | str
    blocks: list[int]
    allocated_at: float = field(default_factory=time.monotonic)
    meta: dict[str, Any] = field(default_factory=dict)


class KvLedger:
    """Allocations keyed by sequence id (NanoDeploy seq_id, vLLM request id, LMDeploy session id).

    A free of a key that was freed before counts as a double free; a free of a key never allocated
    counts as ``unknown_free``. Both are the bugs a router must not have, so tests assert on them.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every allocation and counter (``POST /sim/reset``)."""
        self.entries: dict[int | str, KvEntry] = {}
        self.freed_keys: set[int | str] = set()
        self.allocated = 0
        self.freed = 0
        self.double_free = 0
        self.unknown_free = 0
        self.expired = 0
        self._next_block = 0

    def allocate(self, key: int | str, n_blocks: int, **meta: Any) -> KvEntry:
        blocks = list(range(self._next_block, self._next_block + max(1, n_blocks)))
        self._next_block += len(blocks)
        entry = KvEntry(key, blocks, meta=meta)
        self.entries[key] = entry
        self.freed_keys.discard(key)
        self.allocated += 1
        return entry

    def get(self, key: object) -> KvEntry | None:
        """The entry held under ``key``; None for any other value (an id from a request body is unchecked)."""
        return self.entries.get(key) if isinstance(key, int | str) else None

    def free(self, key: int | str) -> bool:
        """Release ``key``; True when it was held."""
        if self.entries.pop(key, None) is not None:
            self.freed_keys.add(key)
            self.freed += 1
            return True
        if key in self.freed_keys:
            self.double_free += 1
        else:
            self.unknown_free += 1
        return False

    def expire_older_than(self, max_age_s: float) -> int:
        """Free entries nobody claimed in time (what vLLM does after its abort timeout)."""
        now = time.monotonic()
        stale = [k for k, e in self.entries.items() if now - e.allocated_at > max_age_s]
        for key in stale:
            del self.entries[key]
            self.freed_keys.add(key)
            self.expired += 1
        return len(stale)

    def snapshot(self) -> KvLedgerSnapshot:
        now = time.monotonic()
        return {
            "allocated": self.allocated,
            "freed": self.freed,
            "double_free": self.double_free,
            "unknown_free": self.unknown_free,
            "expired": self.expired,
            "outstanding_count": len(self.entries),
            "outstanding": [
                {"id": e.key, "blocks": len(e.blocks), "age_s": round(now - e.allocated_at, 3)}
                for e in self.entries.values()
            ],
        }
