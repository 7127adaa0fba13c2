"""Hostile and measuring HTTP clients on raw sockets, for the end-to-end tests of the HTTP edge and
of restarts: a latency probe, a huge request head, sockets that hold a server with partial requests,
and a load that classifies every request (answered, refused before sending, lost, truncated).

Raw sockets, not httpx: these clients must send what no library sends (a 96 MiB header, half a
head) and must tell "the server closed an idle connection" (a pool reconnects, nothing is lost)
from "the server dropped a request it had received" (lost). Loopback only; every loop is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from dataclasses import dataclass, field


class Lost(Exception):
    """The request went out and no status line came back."""


class Truncated(Exception):
    """The answer started and did not finish."""


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    keep_alive: bool


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One HTTP/1.1 answer (content-length or chunked). Raises ``Lost`` before the status line,
    ``Truncated`` after it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise Lost(type(exc).__name__) from None
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if b":" in line:
            name, value = line.split(b":", 1)
            headers[name.strip().lower()] = value.strip()
    keep = headers.get(b"connection", b"").lower() != b"close"
    try:
        if b"content-length" in headers:
            return Answer(status, headers, await reader.readexactly(int(headers[b"content-length"])), keep)
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return Answer(status, headers, body, keep)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
        raise Truncated(type(exc).__name__) from None


def post(path: str, body: bytes, *, key: str, close: bool = False) -> bytes:
    """A raw POST of a JSON ``body`` with the proxy ``key``."""
    extra = b"Connection: close\r\n" if close else b""
    return (
        b"POST %s HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
        b"%sContent-Length: %d\r\n\r\n%s" % (path.encode(), key.encode(), extra, len(body), body)
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class ProbeResult:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)


async def probe(
    port: int, request: bytes, stop: asyncio.Event, *, clients: int = 4, interval: float = 0.02
) -> ProbeResult:
    """``clients`` keep-alive clients and one that opens a new connection per request, each sending
    ``request`` every ``interval`` seconds until ``stop`` is set; every latency and every failure."""
    result = ProbeResult()

    async def keepalive() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while not stop.is_set():
            started = time.monotonic()
            try:
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                answer = await asyncio.wait_for(read_answer(reader), 30)
                if answer.status != 200:
                    result.errors.append(f"HTTP {answer.status}")
            except (OSError, Lost, Truncated, TimeoutError) as exc:
                result.errors.append(type(exc).__name__)
                if writer is not None:
                    writer.close()
                reader = writer = None
            else:
                result.latencies.append(time.monotonic() - started)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
        if writer is not None:
            writer.close()

    async def fresh() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                answer = await asyncio.wait_for(read_answer(reader), 30)
                writer.close()
                if answer.status != 200:
                    result.errors.append(f"HTTP {answer.status}")
            except (OSError, Lost, Truncated, TimeoutError) as exc:
                result.errors.append(type(exc).__name__)
            else:
                result.latencies.append(time.monotonic() - started)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    await asyncio.gather(*[keepalive() for _ in range(clients)], fresh())
    return result


def huge_header(port: int, size: int, *, timeout: float = 120.0) -> tuple[str, float]:
    """Send one request whose ``X-Big`` header is ``size`` bytes, as fast as the socket takes it;
    returns the status line that came back (or what happened instead) and the seconds it took."""
    payload = b"GET /v1/models HTTP/1.1\r\nHost: attacker\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    started = time.monotonic()
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        # A server that stopped reading resets the rest: its answer is waiting for us all the same.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        try:
            while b"\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except (ConnectionResetError, TimeoutError, OSError) as exc:
            answer = answer or f"<{type(exc).__name__}>".encode()
    return answer.split(b"\r\n", 1)[0].decode("latin-1") or "<closed without an answer>", time.monotonic() - started


# Partial requests that hold a connection: half a head, or a whole head and a tenth of the body.
HOLD = {
    "idle": b"",
    "partial head": b"POST /v1/chat/completions HTTP/1.1\r\nHost: slow\r\nX-Slow: ",
    "partial body": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json\r\n%s"
        b'Content-Length: 100000\r\n\r\n{"model": "x"'
    ),
}


@dataclass
class HoldResult:
    kind: str
    sockets: int
    closed_after: list[float] = field(default_factory=list)  # seconds after connecting
    answers: Counter[str] = field(default_factory=Counter)  # status line (or "(nothing)") -> count

    @property
    def still_open(self) -> int:
        return self.sockets - len(self.closed_after)


async def hold(port: int, kind: str, sockets: int, seconds: float, *, key: str = "") -> HoldResult:
    """Open ``sockets`` connections that send ``HOLD[kind]`` and nothing more; wait up to
    ``seconds`` for the server to close each; what it answered and when. A partial body carries the
    proxy ``key``, so the application waits for the body instead of answering 401 at once."""
    result = HoldResult(kind, sockets)
    payload = HOLD[kind]
    if kind == "partial body":
        payload %= (b"Authorization: Bearer %s\r\n" % key.encode()) if key else b""

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened = time.monotonic()
        writer.write(payload)
        data = b""
        try:
            while True:
                remaining = opened + seconds - time.monotonic()
                if remaining <= 0:
                    break
                chunk = await asyncio.wait_for(reader.read(4096), remaining)
                if not chunk:
                    result.closed_after.append(time.monotonic() - opened)
                    break
                data += chunk
        except TimeoutError:
            pass
        except OSError:
            result.closed_after.append(time.monotonic() - opened)
        finally:
            writer.close()
        result.answers[data.split(b"\r\n", 1)[0].decode("latin-1") or "(nothing)"] += 1

    await asyncio.gather(*[one() for _ in range(sockets)])
    return result


class Load:
    """Clients that keep a server busy until ``stop``, each request classified: ``ok``, ``refused``
    (nothing was sent: a client retries safely), ``lost`` (sent, never answered), ``truncated``
    (an answer that did not finish), ``http_<status>``.

    - ``streams``: each opens a connection, reads a whole SSE stream (``stream_request``), again;
    - ``keepalive``: POSTs back to back on one connection each, reconnecting when the server closed
      it; a connection found closed *before* sending is not a failure (every pool checks);
    - ``fresh``: one new connection per request.
    """

    def __init__(self, port: int, stream_request: bytes, request: bytes, *, pace: float = 0.01) -> None:
        self.port = port
        self.stream_request = stream_request
        self.request = request
        self.pace = pace
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (client kind, outcome) -> count
        self.streams_open = 0
        self.max_seconds = 60.0  # no client loop runs longer than this, whatever happens

    def record(self, kind: str, outcome: str) -> None:
        self.outcomes[(kind, outcome)] += 1

    def count(self, outcome: str) -> int:
        return sum(n for (_, o), n in self.outcomes.items() if o == outcome)

    async def run(self, stop: asyncio.Event, *, streams: int = 8, keepalive: int = 16, fresh: int = 2) -> None:
        deadline = time.monotonic() + self.max_seconds
        tasks = [self._stream(stop, deadline) for _ in range(streams)]
        tasks += [self._keepalive(stop, deadline) for _ in range(keepalive)]
        tasks += [self._fresh(stop, deadline) for _ in range(fresh)]
        await asyncio.gather(*tasks)

    async def _open(self, kind: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            self.record(kind, "refused")
            await asyncio.sleep(0.05)
            return None

    async def _exchange(
        self, kind: str, reader: asyncio.StreamReader, request: bytes, done: bytes = b""
    ) -> Answer | None:
        try:
            answer = await asyncio.wait_for(read_answer(reader), 30)
        except Lost:
            self.record(kind, "lost")
            return None
        except (Truncated, TimeoutError):
            self.record(kind, "truncated")
            return None
        if answer.status != 200:
            self.record(kind, f"http_{answer.status}")
        elif done and not answer.body.endswith(done):
            self.record(kind, "truncated")
        else:
            self.record(kind, "ok")
        return answer

    async def _stream(self, stop: asyncio.Event, deadline: float) -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            opened = await self._open("stream")
            if opened is None:
                continue
            reader, writer = opened
            self.streams_open += 1
            writer.write(self.stream_request)
            await self._exchange("stream", reader, self.stream_request, b"data: [DONE]\n\n")
            self.streams_open -= 1
            writer.close()

    async def _keepalive(self, stop: asyncio.Event, deadline: float) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while not stop.is_set() and time.monotonic() < deadline:
            if writer is not None and reader is not None and (reader.at_eof() or writer.is_closing()):
                writer.close()  # closed by the server while idle: a pool drops it, nothing lost
                reader = writer = None
            if writer is None or reader is None:
                opened = await self._open("keepalive")
                if opened is None:
                    continue
                reader, writer = opened
            writer.write(self.request)
            answer = await self._exchange("keepalive", reader, self.request)
            if answer is None or not answer.keep_alive:
                writer.close()
                reader = writer = None
            await asyncio.sleep(self.pace)
        if writer is not None:
            writer.close()

    async def _fresh(self, stop: asyncio.Event, deadline: float) -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            opened = await self._open("fresh")
            if opened is None:
                continue
            reader, writer = opened
            writer.write(self.request)
            await self._exchange("fresh", reader, self.request)
            writer.close()
            await asyncio.sleep(self.pace)
