"""Socket writes the data path makes during one turn of the event loop, written together at the
start of its next turn (``Outgoing``): the engine client's requests (``proxy.httpclient``) and the
lane's answers and stream chunks to clients (``routerpanel.proxylane``).

A write to a loopback socket wakes the process at the other end. On a virtual machine, waking a
process whose virtual CPU is idle costs the writer an interrupt to that CPU through the hypervisor:
measured on the 2-core VM ``make bench`` runs on, at 32 clients, a request's write to an engine took
about 20 µs of the worker's CPU and an answer's write to the client about 11 µs, of about 125 µs per
request. Written back to back, the writes after the first of a turn find their readers awake or
about to be, and cost a fraction of that (docs/architecture.md, "Writes at the end of the loop's
turn"). At one client a turn has one write, which then waits for one more turn of the loop (an
``epoll_wait`` that returns at once).

Nothing of this imports Django: the HTTP edge loads it before the application.
"""

from __future__ import annotations

import asyncio
import weakref


class Outgoing:
    """This event loop's writes waiting for the loop's next turn, per transport in order."""

    __slots__ = ("loop", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: dict[asyncio.BaseTransport, bytes] = {}

    def write(self, transport: asyncio.Transport, data: bytes) -> None:
        """Write ``data`` at the loop's next turn, after what ``transport`` was already given. A
        transport closed by then (its request given up, its peer gone) is not written to."""
        pending = self.pending
        if not pending:
            self.loop.call_soon(self.flush)
        earlier = pending.get(transport)
        pending[transport] = data if earlier is None else earlier + data

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for transport, data in pending.items():
            if not transport.is_closing():
                transport.write(data)  # type: ignore[attr-defined]

    def flush_for(self, transport: asyncio.Transport) -> None:
        """Write what waits for ``transport`` now: before anything else is written to it or it is
        closed outside the data path (a new request's bytes, a rejection, a shutdown)."""
        data = self.pending.pop(transport, None)
        if data is not None and not transport.is_closing():
            transport.write(data)


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outgoing] = weakref.WeakKeyDictionary()
_last: Outgoing | None = None  # a web worker has one loop: one comparison, not a lookup


def outgoing(loop: asyncio.AbstractEventLoop) -> Outgoing:
    """``loop``'s writes (one ``Outgoing`` per loop, however many loops a process runs)."""
    global _last
    last = _last
    if last is not None and last.loop is loop:
        return last
    last = _by_loop.get(loop)
    if last is None:
        last = _by_loop[loop] = Outgoing(loop)
    _last = last
    return last
