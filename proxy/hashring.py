"""The consistent-hash ring ``proxy.strategies.consistent_hash`` routes sessions by.

Each node gets points on a ring of 64-bit hashes in proportion to its weight; a key belongs to the
node of the first point clockwise from it, and when that node may not take it, to the next node
clockwise. Adding or removing a node moves only the keys of that node's arcs, and a node passed over
(out of rotation, at its limit, behind a breaker) moves only its own keys.

A lookup does not search the ring: the hash space is cut into ``TABLE_SLOTS`` equal slices and a
table holds, for each slice, the node of the first point at or after its start, so a key is one
read of one slot of a table whose size does not depend on the number of nodes. Searching the ring
itself (128,000 points at 1,000 nodes of weights 1 to 3) read megabytes that no longer fit the CPU's
caches, and cost more at a thousand nodes than at two
(docs/decisions/0009-routing-cost-independent-of-fleet-size.md). Only a key whose node is passed
over searches the ring, for the points after its slice's.
"""

from __future__ import annotations

import bisect
import hashlib
from array import array
from collections.abc import Callable, Iterable

from .snapshot import Target

# Each node gets this many points on the ring per unit of weight (capped).
RING_POINTS_PER_WEIGHT = 64
RING_MAX_POINTS_PER_NODE = 64 * 16
# Slices of the hash space in the lookup table: the table is 256 KiB (two bytes a slot up to 65,536
# nodes), small enough to stay in the CPU's caches; a slice is about half a point's arc at 1,000
# nodes of weights 1 to 3, so the table spreads keys nearly as evenly as the ring itself.
TABLE_BITS = 17
TABLE_SLOTS = 1 << TABLE_BITS
_SHIFT = 64 - TABLE_BITS


def hash64(text: str) -> int:
    # surrogatepass: a session key from the client's JSON ("user") may hold a lone surrogate, which
    # strict UTF-8 cannot encode; any fixed bytes do for a hash.
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring over nodes, with its lookup table. Built once per set of targets and
    cached by the router; a lookup takes the first node clockwise from the key that is usable."""

    __slots__ = ("_hashes", "_ids", "_owners", "_table")

    def __init__(self, targets: Iterable[Target]) -> None:
        ids: list[int] = []
        known: set[int] = set()
        points: list[tuple[int, int]] = []  # (hash, index of its node in ``ids``)
        for target in targets:
            if target.node.id in known:
                continue
            known.add(target.node.id)
            member = len(ids)
            ids.append(target.node.id)
            count = min(RING_POINTS_PER_WEIGHT * max(target.node.weight, 1), RING_MAX_POINTS_PER_NODE)
            points.extend((hash64(f"{target.node.url}#{i}"), member) for i in range(count))
        points.sort()
        self._ids = tuple(ids)
        typecode = "H" if len(ids) <= 1 << 16 else "I"
        # Flat arrays, not lists of int objects: the walk past a node reads a few cache lines of them.
        self._hashes = array("Q", [p[0] for p in points])
        self._owners = array(typecode, [p[1] for p in points])
        self._table = array(typecode)
        if points:
            self._table.frombytes(_slices(self._hashes, self._owners, typecode))

    @property
    def table_size(self) -> int:
        """How many slots the lookup table has: the same for any number of nodes."""
        return len(self._table)

    def lookup(self, key: str, usable: Callable[[int], bool]) -> int | None:
        """The first node clockwise from ``key`` for which ``usable(node id)`` holds, None if none."""
        if not self._ids:
            return None
        slot = hash64(key) >> _SHIFT
        node_id = self._ids[self._table[slot]]
        if usable(node_id):
            return node_id
        return self._walk(slot, node_id, usable)

    def _walk(self, slot: int, first: int, usable: Callable[[int], bool]) -> int | None:
        """The next usable node clockwise after the point that owns ``slot`` (whose node, ``first``,
        is not usable): the path of a key whose node is passed over, O(log n) and a short walk."""
        hashes, owners, ids = self._hashes, self._owners, self._ids
        n = len(hashes)
        start = bisect.bisect_left(hashes, slot << _SHIFT)  # the slot's owning point (n: wraps to 0)
        seen = {first}
        for i in range(1, n):
            node_id = ids[owners[(start + i) % n]]
            if usable(node_id):
                return node_id
            seen.add(node_id)
            if len(seen) >= len(ids):
                break
        return None


def _slices(hashes: array[int], owners: array[int], typecode: str) -> bytes:
    """The lookup table's bytes: for each slice of the hash space, the owner of the first point at or
    after the slice's start (the first point's owner past the last point: the ring wraps). A point
    owns the slices that start after the point before it and at or before it."""
    encoded = [array(typecode, [member]).tobytes() for member in range(max(owners) + 1)]
    parts: list[bytes] = []
    before = -1  # the last slice owned so far
    for point_hash, owner in zip(hashes, owners, strict=True):
        last = point_hash >> _SHIFT
        if last > before:
            parts.append(encoded[owner] * (last - before))
            before = last
    parts.append(encoded[owners[0]] * (TABLE_SLOTS - 1 - before))
    return b"".join(parts)
