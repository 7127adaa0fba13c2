"""The load phases ``make bench`` runs against each system: one-client latency, wrk, streams, and the
process figures (CPU seconds and peak RSS from ``/proc``) that turn them into per-request costs."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Streams paced at 5 ms per token whose first event each system's figure is taken from, 4 at a time.
# At 24, two runs of the same build differed by up to 1 ms at p50: too few to resolve an added 0.3 ms.
PACED_STREAMS = 96
UNPACED_SECONDS = 2.0  # unpaced streams run at least this long (chunks/s)


def chat_body(model: str, tokens: int, *, stream: bool = False) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"[[len={tokens}]] hello"}], "max_tokens": tokens}
    if stream:
        body["stream"] = True
    return body


# -- process figures ---------------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """CPU seconds ``pid`` spent in user space and in the kernel (utime, stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (from every thread's ``children`` list in ``/proc``)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (uvicorn's master and its worker processes, say)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        with contextlib.suppress(OSError):
            todo += children(current)
    return tree


def tree_cpu_times(pid: int) -> tuple[float, float]:
    """User and kernel CPU seconds of ``pid`` and its live descendants (a worker that exits takes
    its share along)."""
    user = system = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            member_user, member_system = cpu_times(member)
            user += member_user
            system += member_system
    return user, system


def tree_cpu_seconds(pid: int) -> float:
    return sum(tree_cpu_times(pid))


def worker_rss_mb(pid: int) -> tuple[float, float]:
    """Peak RSS of the largest process in ``pid``'s tree, and the sum of every member's peak (MB).

    Under ``uvicorn --workers N`` the largest is a web worker (the master only supervises); the sum
    is an upper bound of the tree's memory, since pages shared after the fork count in each."""
    peaks = [peak_rss_mb(member) for member in process_tree(pid)]
    return max(peaks), sum(peaks)


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy (``/proc/stat``: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children that were waited for (a finished wrk run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- one client latency ------------------------------------------------------------------------


def one_client_latency(base: str, path: str, headers: dict, body: dict, count: int) -> list[float]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    payload = json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **headers}
    samples = []
    for i in range(count + 50):
        started = time.perf_counter()
        conn.request("POST", path, body=payload, headers=all_headers)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{base}{path} answered {response.status}")
        if i >= 50:  # warm-up excluded
            samples.append(time.perf_counter() - started)
    conn.close()
    return samples


# -- wrk ---------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    requests: int
    errors: int
    cpu_us: float | None = None
    kernel_us: float | None = None  # the part of ``cpu_us`` spent in the kernel (stime)
    # Cores used over the run by each process tree ``run_wrk`` was asked to watch, by wrk, and by the
    # rest of the machine (``other``: whatever else runs on it).
    cores: dict[str, float] = field(default_factory=dict)


def _wrk_figure(pattern: str, out: str) -> str:
    """The figure ``pattern`` captures in wrk's report (which always prints it when wrk ran)."""
    match = re.search(pattern, out)
    if match is None:
        raise RuntimeError(f"no {pattern!r} in wrk's output:\n{out}")
    return match.group(1)


def run_wrk(
    url: str,
    headers: dict,
    body: dict,
    connections: int,
    duration: int,
    pid: int | None,
    *,
    tree: bool = False,
    watch: dict[str, list[int]] | None = None,
) -> WrkResult:
    """wrk's figures for ``url``, and the CPU per request of ``pid`` (with its descendants if
    ``tree``); ``watch`` names process trees (engines, Redis...) whose cores used are reported too."""
    cpu = tree_cpu_times if tree else cpu_times
    watch = watch or {}

    def watched() -> dict[str, float]:
        return {name: sum(tree_cpu_seconds(p) for p in pids) for name, pids in watch.items()}

    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}"]
    lines += [
        f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}"
        for k, v in {"Content-Type": "application/json", **headers}.items()
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines) + "\n")
    try:
        before = cpu(pid) if pid else (0.0, 0.0)
        others, wrk_before, busy = watched(), children_cpu_seconds(), machine_busy_seconds()
        started = time.perf_counter()
        result = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s", script.name, url],
            check=True,
            capture_output=True,
            text=True,
        )
        after = cpu(pid) if pid else (0.0, 0.0)
        elapsed = time.perf_counter() - started
        cores = {name: (spent - others[name]) / elapsed for name, spent in watched().items()}
        cores["wrk"] = (children_cpu_seconds() - wrk_before) / elapsed
        cores["other"] = (machine_busy_seconds() - busy) / elapsed - sum(cores.values())
    finally:
        os.unlink(script.name)
    out = result.stdout
    rps = float(_wrk_figure(r"Requests/sec:\s+([\d.]+)", out))
    requests = int(_wrk_figure(r"(\d+) requests in", out))
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    cpu_us = kernel_us = None
    if pid and requests:
        cpu_us = (sum(after) - sum(before)) / requests * 1e6
        kernel_us = (after[1] - before[1]) / requests * 1e6
    return WrkResult(rps=rps, requests=requests, errors=errors, cpu_us=cpu_us, kernel_us=kernel_us, cores=cores)


# -- streams -----------------------------------------------------------------------------------


@dataclass
class StreamResult:
    ttfe: list[float] = field(default_factory=list)
    events: int = 0
    elapsed: float = 0.0
    errors: int = 0

    @property
    def chunks_per_s(self) -> float:
        return self.events / self.elapsed if self.elapsed else 0.0


async def _streams(url: str, headers: dict, body: dict, concurrency: int, count: int, seconds: float) -> StreamResult:
    result = StreamResult()
    payload = json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **headers}
    remaining = count
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        until = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0 or time.perf_counter() < until:
                remaining -= 1
                started = time.perf_counter()
                first = None
                events = 0
                async with session.post(url, data=payload, headers=all_headers) as response:
                    if response.status != 200:
                        result.errors += 1
                        await response.read()
                        continue
                    async for chunk in response.content.iter_any():
                        if first is None:
                            first = time.perf_counter() - started
                        events += chunk.count(b"data: ")
                if first is not None:
                    result.ttfe.append(first)
                result.events += events

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        result.elapsed = time.perf_counter() - started
    return result


def streams(url: str, headers: dict, body: dict, concurrency: int, count: int, seconds: float = 0.0) -> StreamResult:
    """``count`` streams, ``concurrency`` at a time, and more until ``seconds`` have passed: a fast
    system's 400 unpaced streams are over in ~70 ms, too short a window for a steady figure."""
    asyncio.run(_streams(url, headers, {**body}, concurrency, 4, 0.0))  # warm-up
    return asyncio.run(_streams(url, headers, body, concurrency, count, seconds))
