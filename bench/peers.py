"""The peer routers ``make bench PEERS=1`` measures beside RouterPanel: vllm-router and sglang-router.

Both are Rust routers shipped on PyPI with a Python launcher. ``make peers-env`` installs each into a
virtualenv of its own (``.venv-peers/<name>``, from ``bench/requirements-<name>.txt``) so neither
reaches RouterPanel's ``.venv``. Each runs in front of the same two fast simulated engines as
RouterPanel, round robin, with its defaults otherwise (health checks, retries and circuit breaker
on); a second instance of it fronts the paced engine for the first-event phase, since neither routes
by model name. The flags are the ones both launchers' ``--help`` list.

``Figures`` holds one system's row of the comparison table; ``comparison`` prints the table with the
ratios to DIRECT.

The phases run one system after the other, and a small shared machine's speed drifts by 10 % and
more within the minutes between them: enough to decide a comparison of two figures as close as
RouterPanel's CPU per request and sglang-router's. ``head_to_head`` therefore measures the two
figures the targets compare with a peer (the added latency at one client, the CPU per request at
c=32) again at the end, every system in turn in each of a few rounds, DIRECT's latency in the
same round, so that each round's difference between two systems is taken a few seconds apart.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.measure import (
    PACED_STREAMS,
    UNPACED_SECONDS,
    chat_body,
    one_client_latency,
    pct,
    peak_rss_mb,
    run_wrk,
    streams,
)
from tests.support.ports import free_port
from tests.support.procs import running

REPO = Path(__file__).resolve().parent.parent
PEERS_VENVS = REPO / ".venv-peers"
PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Peer:
    name: str
    command: tuple[str, ...]  # the launcher and its subcommand, from the peer's venv
    log_level: str  # the launchers spell "warning" differently

    def argv(self, *, port: int, workers: list[str]) -> list[str]:
        launcher = PEERS_VENVS / self.name / "bin" / self.command[0]
        return [
            str(launcher),
            *self.command[1:],
            "--host=127.0.0.1",
            f"--port={port}",
            "--worker-urls",
            *workers,
            "--policy=round_robin",
            f"--log-level={self.log_level}",
            "--prometheus-host=127.0.0.1",
            f"--prometheus-port={free_port()}",  # both default to a fixed port; two instances run at once
        ]

    def installed(self) -> bool:
        return (PEERS_VENVS / self.name / "bin" / self.command[0]).exists()


PEERS = (
    Peer("vllm-router", ("vllm-router",), "warning"),
    Peer("sglang-router", ("sglang-router", "launch"), "warn"),
)


@dataclass
class Figures:
    """One system's row: seconds for times, None where a figure does not apply (DIRECT has no process)."""

    system: str
    latency_p50: float  # one client, non-streaming
    rps_c32: float
    chunks_per_s: float  # 64-chunk unpaced streams, 8 at a time
    first_event_p50: float  # 64-chunk streams at 5 ms pacing
    first_event_p99: float
    cpu_us_c32: float | None = None
    rss_mb: float | None = None


def wait_ready(base: str, model: str, timeout: float = 30.0, headers: dict | None = None) -> None:
    """Until ``base`` answers a chat completion: a router may listen before its workers are registered."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.post(base + PATH, json=chat_body(model, 4), headers=headers, timeout=5).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base} never answered a chat completion for {model}")
        time.sleep(0.2)


@contextlib.contextmanager
def peer_router(peer: Peer, workers: list[str], model: str) -> Iterator[tuple[str, int]]:
    """``peer`` in front of ``workers``, ready: its URL and process id."""
    port = free_port()
    with running(peer.argv(port=port, workers=workers), port=port, timeout=60) as proc:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, model)
        yield base, proc.pid


def measure_peer(
    peer: Peer, *, fast: list[str], paced: str, model: str, paced_model: str, duration: int, latency_requests: int
) -> Figures:
    """The phases run.py runs against RouterPanel, against ``peer``, with the same loads."""
    small = chat_body(model, 16)
    with peer_router(peer, fast, model) as (base, pid):
        latency = one_client_latency(base, PATH, {}, small, latency_requests)
        wrk = run_wrk(base + PATH, {}, small, 32, duration, pid)
        unpaced = streams(base + PATH, {}, chat_body(model, 64, stream=True), 8, 400, UNPACED_SECONDS)
        rss = peak_rss_mb(pid)
    with peer_router(peer, [paced], paced_model) as (paced_base, _):
        paced_streams = streams(paced_base + PATH, {}, chat_body(paced_model, 64, stream=True), 4, PACED_STREAMS)
    return Figures(
        system=peer.name,
        latency_p50=pct(latency, 0.5),
        rps_c32=wrk.rps,
        chunks_per_s=unpaced.chunks_per_s,
        first_event_p50=pct(paced_streams.ttfe, 0.5),
        first_event_p99=pct(paced_streams.ttfe, 0.99),
        cpu_us_c32=wrk.cpu_us,
        rss_mb=rss,
    )


@dataclass(frozen=True)
class Contender:
    """A system ``head_to_head`` measures: where it listens, its process, the headers it needs."""

    name: str
    base: str
    pid: int
    headers: dict[str, str]
    tree: bool = False  # count the process's children's CPU too (RouterPanel's workers)


HEAD_TO_HEAD_ROUNDS = 3


def head_to_head(
    contenders: list[Contender],
    direct: str,
    model: str,
    *,
    rounds: int = HEAD_TO_HEAD_ROUNDS,
    duration: int,
    latency_requests: int,
    extra: Mapping[str, Callable[[Contender], float]] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Per system, per round: the added p50 at one client (seconds, against DIRECT's p50 measured at
    the start of the same round), wrk c=32's CPU per request (µs) and each of ``extra``'s figures
    (measured right after, in the same turn). Each round starts with the next system, so none is
    always measured first. A pass over every system, not counted, comes first: in three runs
    without it, the system measured first, seconds after the peers had started, took 8 to 22 % more
    CPU per request than in its two later rounds."""
    small = chat_body(model, 16)
    extra = extra or {}
    results: dict[str, dict[str, list[float]]] = {
        c.name: {"added_p50": [], "cpu_us_c32": [], **{name: [] for name in extra}} for c in contenders
    }
    for contender in contenders:
        one_client_latency(contender.base, PATH, contender.headers, small, latency_requests // 4)
        run_wrk(contender.base + PATH, contender.headers, small, 32, 2, None)
        for measure in extra.values():
            measure(contender)
    for number in range(rounds):
        baseline = pct(one_client_latency(direct, PATH, {}, small, latency_requests), 0.5)
        start = number % len(contenders)
        for contender in contenders[start:] + contenders[:start]:
            url, headers = contender.base + PATH, contender.headers
            p50 = pct(one_client_latency(contender.base, PATH, headers, small, latency_requests), 0.5)
            wrk = run_wrk(url, headers, small, 32, duration, contender.pid, tree=contender.tree)
            figures = results[contender.name]
            figures["added_p50"].append(p50 - baseline)
            figures["cpu_us_c32"].append(wrk.cpu_us or 0.0)
            for name, measure in extra.items():
                figures[name].append(measure(contender))
    return results


def head_to_head_table(results: dict[str, dict[str, list[float]]]) -> str:
    """The rounds side by side (markdown): each system's figures per round and their medians."""
    lines = ["| system | CPU us/req (c32), each round | median | added p50 us (c1), each round | median |"]
    lines.append("|---|---|---|---|---|")
    for name, figures in results.items():
        cpu, added = figures["cpu_us_c32"], [value * 1e6 for value in figures["added_p50"]]
        lines.append(
            f"| {name} | {' / '.join(f'{v:.0f}' for v in cpu)} | {statistics.median(cpu):.0f} | "
            f"{' / '.join(f'{v:+.0f}' for v in added)} | {statistics.median(added):+.0f} |"
        )
    return "\n".join(lines)


def comparison(rows: list[Figures], direct: Figures) -> str:
    """The systems side by side (markdown), each against DIRECT: added latency and throughput ratios."""
    header = (
        "system",
        "CPU us/req (c32)",
        "added p50 us (c1)",
        "req/s c32 (x direct)",
        "stream chunks/s (x direct)",
        f"first event, 5 ms pacing, p50 / p99 ms (direct {direct.first_event_p50 * 1e3:.2f} / "
        f"{direct.first_event_p99 * 1e3:.2f})",
        "RSS MB",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append(
        f"| direct | | | {direct.rps_c32:,.0f} req/s | {direct.chunks_per_s:,.0f} chunks/s | "
        f"{direct.first_event_p50 * 1e3:.2f} / {direct.first_event_p99 * 1e3:.2f} | |"
    )
    for row in rows:
        cells = (
            row.system,
            f"{row.cpu_us_c32:.0f}" if row.cpu_us_c32 is not None else "",
            f"{(row.latency_p50 - direct.latency_p50) * 1e6:+.0f}",
            f"{row.rps_c32 / direct.rps_c32:.3f}",
            f"{row.chunks_per_s / direct.chunks_per_s:.2f}",
            f"{row.first_event_p50 * 1e3:.2f} / {row.first_event_p99 * 1e3:.2f}",
            f"{row.rss_mb:.0f}" if row.rss_mb is not None else "",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def as_json(rows: list[Figures]) -> list[dict]:
    return [asdict(row) for row in rows]
