"""Instructions per request in the web worker, counted by valgrind (``make bench-instructions``).

CPU seconds on a shared 2-core machine move by a third from one run to the next; instructions do
not. This runs one RouterPanel web worker (uvicorn, production settings) under ``valgrind
--tool=callgrind`` in front of the same fast simulated engines as ``make bench``, sends it exactly
``--requests`` requests per phase from a client outside valgrind (``--concurrency`` at once, over
kept-alive connections), and reads the instructions the worker executed in user space between the
phase's start and end (``callgrind_control``).

Two things differ from a worker in production, both because a worker under valgrind runs about fifty
times slower. The loops that run by the clock (the shared counters, the statistics, the snapshot's
polls) turn once in ten minutes instead of several times a second: a turn that reports on every
recent request would otherwise be counted fifty times over against the requests. What they still
execute is measured with no request at all and subtracted per second. And the disconnect watcher
(``proxy.transport.WATCH_DELAY``), which a fast request never starts, is not started either.
The PD phase also prints how many KV releases one ``/pd/free`` call named (a prefill node's
releases share a call, ``proxy.pd.cleanup``), as ``make bench PD=1`` does: a PD request's count
includes its share of that call.

Phases: a hybrid chat completion, the same request on a NanoDeploy prefill/decode pair (PD), a
hybrid stream, and the request for a model nobody serves (a 404: the client's side alone, with no
routing and no engine). The kernel's share (socket reads and writes, waking the other end) is not
in these counts: ``make bench`` measures it with the rest. ``--keep`` leaves callgrind's dump of each
phase for ``callgrind_annotate``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import chat_body  # noqa: E402
from bench.pd import PD_MODEL, frees_per_call, frees_sent, pd_engines, register  # noqa: E402
from bench.peers import PATH, wait_ready  # noqa: E402
from bench.webenv import API_TOKEN, MODEL, PROXY_KEY, prepare_database, production_env  # noqa: E402
from enginesim.testing import Simulator, run_simulator  # noqa: E402
from nodes.localredis import redis_server_argv  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.procs import EDGE, PYTHON, running  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402

# What each phase sends, and the status every answer must have.
PHASES = {
    "hybrid": (chat_body(MODEL, 16), 200),
    "pd": (chat_body(PD_MODEL, 16), 200),
    "stream": (chat_body(MODEL, 16, stream=True), 200),
    # The same request for a model nobody serves: the client's side alone (authentication, the
    # body's parse, the answer's write), with no routing and no engine call.
    "refused": (chat_body("no-such-model", 16), 404),
}
TOTALS = re.compile(rb"^(?:totals|summary): (\d+)", re.MULTILINE)


class Worker:
    """The web worker under callgrind: counters zeroed and dumped on demand."""

    def __init__(self, pid: int, out_dir: Path, keep: bool) -> None:
        self.pid = pid
        self.out_dir = out_dir
        self.keep = keep
        self.dumps = 0

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.pid)], check=True, capture_output=True, timeout=120)

    def zero(self) -> None:
        self._control("--zero")

    def dump(self, name: str) -> int:
        """Instructions executed since the last zero (or dump)."""
        self._control("--dump")
        self.dumps += 1
        path = self.out_dir / f"callgrind.out.{self.pid}.{self.dumps}"

        def totals() -> int | None:  # the worker writes the dump itself
            match = TOTALS.search(path.read_bytes()) if path.exists() else None
            return None if match is None else int(match.group(1))

        count = wait_until(totals, 60, f"callgrind wrote no totals in {path}")
        assert count is not None  # wait_until returns only what is truthy
        if self.keep:
            path.rename(self.out_dir / f"callgrind.out.{name}")
        else:
            path.unlink()
        return count


async def _load(url: str, body: dict, requests: int, concurrency: int, status: int) -> None:
    headers = {"Authorization": f"Bearer {PROXY_KEY}"}
    left = requests

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url, json=body, headers=headers) as response:
                data = await response.read()
                complete = not body.get("stream") or data.endswith(b"data: [DONE]\n\n")
                if response.status != status or not complete:
                    raise RuntimeError(f"{url} answered {response.status}: {data[:200]!r}")

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))


def measure(
    worker: Worker,
    name: str,
    requests: int,
    concurrency: int,
    idle_rate: float,
    url: str,
    prefill: Simulator | None = None,
) -> float:
    """Instructions per request of one phase, less the background loops' share of its wall time.
    With the PD phase's ``prefill`` engine: also how many KV releases one ``/pd/free`` call named
    (the worker's batching, which the module's doc explains), printed with the phase's figure."""
    body, status = PHASES[name]
    asyncio.run(_load(url, body, concurrency * 2, concurrency, status))  # warm
    before = None if prefill is None else frees_sent(prefill, timeout=60)
    worker.zero()
    started = time.monotonic()
    asyncio.run(_load(url, body, requests, concurrency, status))
    if prefill is not None:  # the last releases go out after the last answer: count them too
        after = frees_sent(prefill, timeout=60)
    elapsed = time.monotonic() - started
    total = worker.dump(name)
    background = idle_rate * elapsed
    print(
        f"  {requests} requests in {elapsed:.1f} s: {total / requests / 1e3:,.1f} k instructions each, "
        f"{background / total:.0%} of them the background loops'",
        file=sys.stderr,
    )
    if prefill is not None:
        assert before is not None
        print(f"  KV releases per /pd/free call: {frees_per_call(before, after):.1f}", file=sys.stderr)
    return (total - background) / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle background measured")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"a subset of {','.join(PHASES)}")
    parser.add_argument("--keep", action="store_true", help="keep callgrind's dump of each phase")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} is required: apt-get install -y valgrind", file=sys.stderr)
            return 2

    tmp = Path(tempfile.mkdtemp(prefix="routerpanel-instr-"))
    redis_port, web_port = free_port(), free_port()
    env = production_env(
        tmp,
        redis_port,
        MALLOC_ARENA_MAX=os.environ.get("MALLOC_ARENA_MAX", "2"),
        # The loops that run by the clock, once in ten minutes (see the module's doc).
        ROUTERPANEL_PROXY_SHARED_INTERVAL="600",
        ROUTERPANEL_PROXY_VERSION_POLL_INTERVAL="600",
        ROUTERPANEL_PROXY_DB_POLL_INTERVAL="600",
    )
    prepare_database(env)
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out.%p"]
    valgrind += ["--dump-instr=no", "--compress-strings=no", "--compress-pos=no"]
    # uvicorn as the Procfile runs it, with no disconnect watcher started (see the module's doc).
    uvicorn = "import proxy.transport as t; t.WATCH_DELAY = 3600.0; "
    uvicorn += "from uvicorn.main import main; main()"
    web = [PYTHON, "-c", uvicorn, "routerpanel.asgi:application", "--host=127.0.0.1", f"--port={web_port}"]
    web += ["--no-access-log", "--loop=uvloop", f"--http={EDGE}", "--log-level=warning"]
    fast = ["--fast", "--record-requests=0"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(redis_server_argv(port=redis_port, data_dir=tmp), port=redis_port))
        sim_a = stack.enter_context(run_simulator(served_model_name=MODEL, extra_args=fast))
        sim_b = stack.enter_context(run_simulator(served_model_name=MODEL, extra_args=fast))
        pd = stack.enter_context(pd_engines())
        proc = stack.enter_context(running([*valgrind, *web], port=web_port, env=env, timeout=600))
        proxy = f"http://127.0.0.1:{web_port}"
        auth = {"Authorization": f"Bearer {PROXY_KEY}"}
        with httpx.Client(base_url=proxy, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=60) as api:
            register(api, *pd)
            for sim in (sim_a, sim_b):
                node = {"url": sim.url, "models": [MODEL], "engine_type": "openai"}
                api.post("/api/nodes/", json=node).raise_for_status()
        wait_ready(proxy, MODEL, timeout=120, headers=auth)
        wait_ready(proxy, PD_MODEL, timeout=120, headers=auth)
        worker = Worker(proc.pid, tmp, args.keep)
        worker.zero()
        time.sleep(args.idle)  # a measured interval: the background loops' instructions per second
        idle_rate = worker.dump("idle") / args.idle
        chosen = [name for name in PHASES if name in args.phases.split(",")]
        figures = {
            name: measure(
                worker, name, args.requests, args.concurrency, idle_rate, proxy + PATH, pd[0] if name == "pd" else None
            )
            for name in chosen
        }
    print(f"one web worker under callgrind, {args.requests} requests per phase at concurrency {args.concurrency}")
    print(f"background loops at idle: {idle_rate / 1e6:,.2f} M instructions/s (subtracted)")
    for name, value in figures.items():
        print(f"{name:>8}: {value / 1e3:8,.1f} k instructions per request")
    if "pd" in figures and "hybrid" in figures:
        print(f"      pd: {figures['pd'] / figures['hybrid']:.2f}x hybrid")
    if args.keep:
        print(f"callgrind's dumps: {tmp}/callgrind.out.<phase>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
