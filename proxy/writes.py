"""Socket writes the data path makes during one turn of the event loop, written together at the
start of its next turn (``Outgoing``): the engine client's requests (``proxy.httpclient``) and the
lane's answers and stream chunks to clients (``routerpanel.proxylane``).

A write to a loopback socket wakes the process at the other end. On a virtual machine, waking a
process whose virtual CPU is idle costs the writer an interrupt to that CPU through the hypervisor:
measured on the 2-core VM ``make bench`` runs on, at 32 clients, a request's write to an engine took
about 20 µs of the worker's CPU and an answer's write to the client about 11 µs, of about 125 µs per
request. Written back to back, the writes after the first of a turn find their readers awake or
about to be, and cost a fraction of that (docs/architecture.md, "Writes at the end of the loop's
turn").

Waiting pays only when a turn has several writes to make. At one client a turn has one, and waiting
costs each request two more turns of the loop (an ``epoll_wait`` that returns at once) and their
latency: 10 to 22 µs a request in three measurements. So while the loop is that quiet (what waited
for the last turn went to one socket, or nothing did) the first write of a turn goes out at once
(``Outgoing.direct``); the rest of that turn's writes wait as before. A stream's chunks always
wait (``wait``): written as the turn's last act, they let the worker sleep at once, which brought a
paced stream's first event sooner (docs/decisions/0015-writes-at-the-loops-next-turn.md).

Nothing of this imports Django: the HTTP edge loads it before the application.
"""

from __future__ import annotations

import asyncio
import weakref


class Outgoing:
    """This event loop's writes waiting for the loop's next turn, per transport in order; while the
    loop is quiet (``direct``), a turn's first write goes out at once."""

    __slots__ = ("direct", "loop", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: dict[asyncio.BaseTransport, bytes] = {}
        self.direct = False

    def write(self, transport: asyncio.Transport, data: bytes, *, wait: bool = False) -> None:
        """Write ``data`` at the loop's next turn, after what ``transport`` was already given (or now,
        as the first write of a quiet turn, unless ``wait``). A transport closed by then (its
        request given up, its peer gone) is not written to."""
        if self.direct and not wait:  # nothing waits (``flush`` and ``_quiet`` say so): nothing is overtaken
            self.direct = False  # the rest of this turn's writes wait
            self.loop.call_soon(self._quiet)
            if not transport.is_closing():
                transport.write(data)
            return
        self.direct = False  # nothing written at once may overtake this
        pending = self.pending
        if not pending:
            self.loop.call_soon(self.flush)
        earlier = pending.get(transport)
        pending[transport] = data if earlier is None else earlier + data

    def _quiet(self) -> None:
        """The end of a turn whose first write went out at once: if no other write followed it, the
        next turn's first need not wait either (if one did, ``flush`` decides)."""
        if not self.pending:
            self.direct = True

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        self.direct = len(pending) == 1  # one socket's writes waited: the loop is quiet
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


def quiet() -> bool:
    """Whether the web worker's loop (the last that wrote) writes a turn's first write at once
    (``Outgoing.direct``): what a caller about to write may do first, or after."""
    last = _last
    return last is not None and last.direct
