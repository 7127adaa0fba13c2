"""Start simulated engines from tests (this project's and the proxy's) and talk to their ``/sim/*`` API.

with run_simulator(engine="nanodeploy", role="prefill", ttft_ms=0) as sim:
    httpx.post(sim.url + "/v1/completions", json={...})
    assert sim.stats()["kv"]["outstanding_count"] == 1
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypedDict, Unpack

import httpx

from enginesim.shapes import RecordedRequest, SimStats

REPO_ROOT = Path(__file__).resolve().parents[1]


def port_range() -> tuple[int, int]:
    """Where this process takes ports for the servers it starts: below the kernel's ephemeral range
    (``net.ipv4.ip_local_port_range``), where no outgoing connection and no bind to port 0 can take a
    port between its choice and the moment a slow-starting server binds it, in a slice of its own per
    pytest-xdist worker (``PYTEST_XDIST_WORKER``), so parallel test processes never pick the same."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low, high = 10000, max(min(ephemeral_low, 32768), 12000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    slices = 4
    width = (high - low) // slices
    start = low + (int(worker) % slices if worker.isdigit() else 0) * width
    return start, start + width


_next_port: list[int] = []  # where the next port is looked for: ports are handed out in turn, not reused soon


def free_port_block(count: int) -> int:
    """The first of ``count`` consecutive ports on 127.0.0.1 that nobody listens on now, from
    ``port_range()``, taken in turn (a port handed out is not handed out again before the whole
    range has been)."""
    low, high = port_range()
    if not _next_port:
        _next_port.append(low + os.getpid() % (high - low - count))
    for _ in range(high - low):
        base = _next_port[0] if _next_port[0] + count <= high else low
        _next_port[0] = base + count
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no block of {count} free ports in {low}-{high}")


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on now (see ``free_port_block``)."""
    return free_port_block(1)


class SimulatorOptions(TypedDict, total=False):
    """The options ``simulator_argv`` takes besides the port, which ``run_simulator`` passes on."""

    engine: str
    role: str
    host: str
    served_model_name: str
    model_path: str
    ttft_ms: float
    itl_ms: float
    extra_args: Sequence[str]


DEFAULT_HOST = "127.0.0.1"


def simulator_argv(
    *,
    engine: str = "openai",
    role: str = "hybrid",
    port: int,
    host: str = DEFAULT_HOST,
    served_model_name: str = "sim-model",
    model_path: str = "/models/sim-model",
    ttft_ms: float = 0.0,
    itl_ms: float = 0.0,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line of ``python -m enginesim`` with these options."""
    return [
        sys.executable,
        "-m",
        "enginesim",
        f"--engine={engine}",
        f"--role={role}",
        f"--host={host}",
        f"--port={port}",
        f"--served-model-name={served_model_name}",
        f"--model-path={model_path}",
        f"--ttft-ms={ttft_ms}",
        f"--itl-ms={itl_ms}",
        *extra_args,
    ]


class SimulatorProcess(subprocess.Popen[bytes]):
    """A simulator's process and the file its output goes to."""

    log_file: IO[bytes] | None = None


class Simulator:
    """A running simulator process and helpers for its admin API."""

    def __init__(self, proc: subprocess.Popen, host: str, port: int) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}"

    def _get(self, path: str) -> Any:
        response = httpx.get(self.url + path, timeout=10.0)
        response.raise_for_status()
        return response.json()

    def stats(self) -> SimStats:
        return self._get("/sim/stats")

    def requests(self, limit: int | None = None) -> list[RecordedRequest]:
        suffix = f"?limit={limit}" if limit is not None else ""
        return self._get("/sim/requests" + suffix)["requests"]

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        response = httpx.post(self.url + "/sim/faults", json=faults, timeout=10.0)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        httpx.post(self.url + "/sim/reset", timeout=10.0).raise_for_status()

    def wait_for(self, predicate: Callable[[SimStats], bool], *, timeout: float = 10.0) -> SimStats:
        """Poll ``/sim/stats`` until ``predicate(stats)`` holds; returns the stats (fails on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s; last stats: {stats}")
            time.sleep(0.05)

    def output(self) -> str:
        """What the process printed (only once it has exited)."""
        return _read_log(self.proc)


def _read_log(proc: subprocess.Popen) -> str:
    log = getattr(proc, "log_file", None)
    if log is None:
        return proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    log.seek(0)
    return log.read().decode(errors="replace")


def wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = _read_log(proc)
            raise RuntimeError(f"simulator exited with {proc.returncode}:\n{out[-4000:]}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"simulator did not listen on {host}:{port} within {timeout} s")


@contextlib.contextmanager
def run_simulator(
    *,
    port: int | None = None,
    wait: bool = True,
    env: dict[str, str] | None = None,
    **options: Unpack[SimulatorOptions],
) -> Iterator[Simulator]:
    """Run a simulator process for the ``with`` block; SIGTERM (then SIGKILL) and reap it afterwards.

    ``options`` are ``simulator_argv``'s (with its defaults); ``port`` defaults to a free one.
    """
    port = port or free_port()
    host = options.get("host", DEFAULT_HOST)
    argv = simulator_argv(port=port, **options)
    # Output goes to a file, not a pipe: nobody drains a pipe during a long test, and a full pipe
    # would block the simulator on its next log line.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    proc = SimulatorProcess(
        argv,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc.log_file = log
    try:
        if wait:
            wait_listening(host, port, proc)
        yield Simulator(proc, host, port)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports nobody listens on right now (``free_port`` hands out each once)."""
    return [free_port() for _ in range(count)]


class Fleet:
    """Many simulated engines served by one process (``--fleet``): their URLs and the process."""

    def __init__(self, proc: subprocess.Popen, host: str, ports: list[int]) -> None:
        self.proc = proc
        self.host = host
        self.ports = ports
        self.urls = [f"http://{host}:{port}" for port in ports]

    def output(self) -> str:
        return _read_log(self.proc)


@contextlib.contextmanager
def run_fleet(
    count: int,
    *,
    engine: str = "openai",
    host: str = "127.0.0.1",
    served_model_name: str = "sim-model",
    fast: bool = True,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
    attempts: int = 3,
) -> Iterator[Fleet]:
    """``count`` engines in one simulator process (``--fast`` by default: no artificial latency), on
    free ports; yields once every one of them listens. One process keeps a fleet of hundreds or
    thousands cheap: an idle engine costs a listening socket and a few objects. A port taken by
    someone else between choosing and binding (other jobs on the machine) means new ports and
    another try, up to ``attempts``."""
    import json

    for attempt in range(attempts):
        ports = free_ports(count)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as spec:
            json.dump([{"port": port} for port in ports], spec)
        argv = simulator_argv(
            engine=engine,
            host=host,
            port=ports[0],
            served_model_name=served_model_name,
            extra_args=[*(["--fast"] if fast else []), "--fleet", spec.name, *extra_args],
        )
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log_file = log  # type: ignore[attr-defined]
        try:
            deadline = time.monotonic() + timeout
            try:
                for port in ports:
                    wait_listening(host, port, proc, timeout=max(0.1, deadline - time.monotonic()))
            except RuntimeError as exc:
                if "address already in use" in str(exc) and attempt + 1 < attempts:
                    continue
                raise
            yield Fleet(proc, host, ports)
            return
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            log.close()
            os.unlink(spec.name)
