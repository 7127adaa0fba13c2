"""The load phases ``make bench`` runs against each system: one-client latency, wrk, streams, and the
process figures (CPU seconds and peak RSS from ``/proc``) that turn them into per-request costs."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

CLK_TCK = os.sysconf("SC_CLK_TCK")


def chat_body(model: str, tokens: int, *, stream: bool = False) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"[[len={tokens}]] hello"}], "max_tokens": tokens}
    if stream:
        body["stream"] = True
    return body


# -- process figures ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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


def _wrk_figure(pattern: str, out: str) -> str:
    """The figure ``pattern`` captures in wrk's report (which always prints it when wrk ran)."""
    match = re.search(pattern, out)
    if match is None:
        raise RuntimeError(f"no {pattern!r} in wrk's output:\n{out}")
    return match.group(1)


def run_wrk(url: str, headers: dict, body: dict, connections: int, duration: int, pid: int | None) -> WrkResult:
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}"]
    lines += [
        f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}"
        for k, v in {"Content-Type": "application/json", **headers}.items()
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines) + "\n")
    try:
        before = cpu_seconds(pid) if pid else 0.0
        result = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s", script.name, url],
            check=True,
            capture_output=True,
            text=True,
        )
        after = cpu_seconds(pid) if pid else 0.0
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
    cpu_us = (after - before) / requests * 1e6 if pid and requests else None
    return WrkResult(rps=rps, requests=requests, errors=errors, cpu_us=cpu_us)


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


async def _streams(url: str, headers: dict, body: dict, concurrency: int, count: int) -> StreamResult:
    result = StreamResult()
    payload = json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **headers}
    remaining = count
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
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


def streams(url: str, headers: dict, body: dict, concurrency: int, count: int) -> StreamResult:
    asyncio.run(_streams(url, headers, {**body}, concurrency, 4))  # warm-up
    return asyncio.run(_streams(url, headers, body, concurrency, count))
