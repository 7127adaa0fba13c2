"""What a piece of code leaves to Python's cyclic garbage collector: objects in reference cycles,
which reference counting cannot free. On the data path they cost a collection's CPU and pause every
request in flight, so the suite checks that a request leaves none."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["cyclic_garbage"]


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[list[type]]:
    """The types of the objects left in cycles by the block, in the list it yields, filled when the
    block ends. What was garbage before the block is collected first; the objects found are not kept
    alive, and the collector's settings are restored."""
    found: list[type] = []
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.extend(type(o) for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
