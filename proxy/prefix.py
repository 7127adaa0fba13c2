"""What the ``prefix_cache`` strategy remembers between requests, in bounded memory and O(1) per
request: which node recently served which prompt prefixes (``PrefixIndex``) and how much recent
work each node of a route was given (``Spread``). docs/cache-routing.md tells why and the figures."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixIndex:
    """Remembers which node recently served which prompt prefixes, in bounded memory.

    A prompt is cut into blocks: the first ``min_match`` characters, then ``block`` characters at
    a time, up to ``max_chars``. Each block boundary gets a chained hash (so it stands for the
    whole prefix up to there) mapped to a node id; entries are evicted least-recently-used beyond
    ``max_entries``. The longest remembered prefix wins.
    """

    def __init__(self, *, max_entries: int = 50_000, block: int = 128, max_chars: int = 16_384) -> None:
        self.max_entries = max_entries
        self.block = block
        self.max_chars = max_chars
        self._entries: OrderedDict[int, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def prefix_hashes(self, scope: str, prompt: str, min_match: int) -> list[int]:
        text = prompt[: self.max_chars]
        if len(text) < min_match:
            return []
        hashes = [hash((scope, text[:min_match]))]
        for start in range(min_match, len(text) - self.block + 1, self.block):
            hashes.append(hash((hashes[-1], text[start : start + self.block])))
        return hashes

    def owner(self, hashes: Sequence[int]) -> tuple[int, int, bool] | None:
        """The node holding the longest remembered prefix, how many of ``hashes`` (blocks of the
        prompt) it is known to hold, and whether that prefix is **shared**: a remembered prompt went
        on past it other than this one (a new conversation on another's system prompt), or it is the
        whole prompt (nothing tells it from another prompt that differs only in its last, partial
        block: many short questions on one system prompt). A prefix that is not shared ended a
        remembered prompt that this one goes on from: a conversation's next turn."""
        for i in range(len(hashes) - 1, -1, -1):
            entry = self._entries.get(hashes[i])
            if entry is not None:
                return entry >> 1, i + 1, bool(entry & 1) or i + 1 == len(hashes)
        return None

    def longest_match(self, hashes: Sequence[int], min_match: int) -> tuple[int, int] | None:
        """``owner``'s node and how many prompt characters it is known to hold (for the request's
        explanation, ``proxy.explain``)."""
        found = self.owner(hashes)
        return None if found is None else (found[0], min_match + (found[1] - 1) * self.block)

    def remember(self, hashes: Sequence[int], node_id: int) -> None:
        """``node_id`` computed the prompt of ``hashes``: it holds every block. Each entry keeps the
        node and, in its lowest bit, whether a remembered prompt went on past the block (every
        block but the prompt's last; the last keeps what it had)."""
        if not hashes:
            return
        entries = self._entries
        last = hashes[-1]
        went_on = entries.get(last, 0) & 1
        inner = node_id << 1 | 1
        for h in hashes:
            entries[h] = inner
            entries.move_to_end(h)
        if not went_on:
            entries[last] = inner ^ 1
        while len(entries) > self.max_entries:
            entries.popitem(last=False)


class Spread:
    """What a route's role gave each node lately: the requests, and the placements (requests that
    did not continue a prompt their node served: new conversations). Both fade by a factor
    ``1 - 1/window`` with every request of the route, so they cover about the last ``window``
    requests. Reads and updates are O(1) (a node's figures are brought up to date when read);
    memory grows with the nodes routed to, never with traffic."""

    __slots__ = ("_fade", "_nodes", "_placed", "_ticks", "_total", "window")

    def __init__(self, window: float = 512.0) -> None:
        self.window = window
        self._fade = 1.0 - 1.0 / window
        self._ticks = 0  # requests recorded
        self._total = 0.0  # the requests of every node, as of the last record
        self._placed = 0.0  # the placements of every node, as of the last record
        self._nodes: dict[int, tuple[float, float, int]] = {}  # node id -> (requests, placements, as of tick)

    def given(self, node_id: int) -> tuple[float, float]:
        """(requests, placements) of ``node_id`` lately."""
        entry = self._nodes.get(node_id)
        if entry is None:
            return 0.0, 0.0
        requests, placed, at = entry
        if at == self._ticks:
            return requests, placed
        fade = self._fade ** (self._ticks - at)
        return requests * fade, placed * fade

    def requests(self, node_id: int) -> float:
        return self.given(node_id)[0]

    def placements(self, node_id: int) -> float:
        return self.given(node_id)[1]

    @property
    def total(self) -> float:
        """The recent requests of every node together."""
        return self._total

    @property
    def placed(self) -> float:
        """The recent placements of every node together."""
        return self._placed

    def record(self, node_id: int, *, placed: bool) -> None:
        """One more request sent to ``node_id``; ``placed`` when it did not continue a prompt the node
        served."""
        requests, placements = self.given(node_id)
        self._ticks += 1
        fade = self._fade
        self._nodes[node_id] = (requests * fade + 1.0, placements * fade + placed, self._ticks)
        self._total = self._total * fade + 1.0
        self._placed = self._placed * fade + placed
