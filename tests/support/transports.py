"""A transport that records what is written to it, for tests of what the data path writes and when
(tests/test_proxylane.py, tests/proxy/test_writes.py)."""

from __future__ import annotations

import asyncio
from typing import Any


class Transport:
    """What the protocol and the cycles write, and whether they closed the connection."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def output(self) -> bytes:
        return b"".join(self.written)


async def next_turn() -> None:
    """Return once the loop ran what was scheduled before this call: the writes kept for its next
    turn (``proxy.writes``) are out."""
    loop = asyncio.get_running_loop()
    turned = loop.create_future()
    loop.call_soon(turned.set_result, None)
    await turned
