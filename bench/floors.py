"""``make bench FLOORS=1``: where a request's time goes, layer by layer, in one run.

Four systems in front of the same engines, each adding one layer to the one before:

1. ``passthrough`` (bench/floor_raw.py): no ASGI server, RouterPanel's HTTP client, no features;
2. ``ASGI + own client`` (bench/floor_app.py ``own_client_app``): uvicorn's protocol and the ASGI
   messages on top of 1;
3. ``ASGI + aiohttp`` (bench/floor_app.py ``app``, the table's "floor"): aiohttp's client instead;
4. RouterPanel: 2 plus every feature (auth, routing, shared counters, breakers, stats, metrics,
   usage, explanations).

For each: added latency at one client (p50 over DIRECT), CPU per request and req/s at c=32, and the
first streamed event at 5 ms pacing (p50 and p99 over DIRECT). The differences between rows are the
price of each layer on this machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from bench.measure import PACED_STREAMS, chat_body, one_client_latency, pct, run_wrk, streams, tree_cpu_seconds
from tests.support.ports import free_port
from tests.support.procs import PYTHON, running

PATH = "/v1/chat/completions"


@dataclass
class Layer:
    name: str
    url: str
    pid: int
    headers: dict[str, str]


@contextlib.contextmanager
def floors(env: dict[str, str], upstreams: str) -> Iterator[list[Layer]]:
    """The passthrough and the ASGI floor on RouterPanel's client, running; ``upstreams`` is
    ``FLOOR_UPSTREAMS`` ("model=url,...")."""
    raw_port, asgi_port = free_port(), free_port()
    asgi = [PYTHON, "-m", "uvicorn", "bench.floor_app:own_client_app", "--host=127.0.0.1", f"--port={asgi_port}"]
    asgi += ["--no-access-log", "--loop=uvloop", "--http=httptools", "--lifespan=off"]
    env = {**env, "FLOOR_UPSTREAMS": upstreams}
    with (
        running([PYTHON, "bench/floor_raw.py"], port=raw_port, env={**env, "FLOOR_PORT": str(raw_port)}) as raw,
        running(asgi, port=asgi_port, env=env) as own,
    ):
        yield [
            Layer("passthrough (no ASGI)", f"http://127.0.0.1:{raw_port}", raw.pid, {}),
            Layer("ASGI + own client", f"http://127.0.0.1:{asgi_port}", own.pid, {}),
        ]


def measure_layers(
    layers: list[Layer], direct: str, paced: str, model: str, paced_model: str, duration: int, latency_requests: int
) -> str:
    """Measure DIRECT and then each layer in turn; the table as text."""
    small = chat_body(model, 16)
    paced_body = chat_body(paced_model, 64, stream=True)
    direct_p50 = pct(one_client_latency(direct, PATH, {}, small, latency_requests), 0.5)
    direct_stream = streams(paced + PATH, {}, paced_body, 4, PACED_STREAMS)
    d50, d99 = pct(direct_stream.ttfe, 0.5), pct(direct_stream.ttfe, 0.99)
    lines = [
        f"{'layer':<24}{'added p50, 1 client':>22}{'CPU/req c=32':>15}{'req/s c=32':>12}"
        f"{'first event +p50 / +p99 (5 ms)':>34}",
    ]
    for layer in layers:
        p50 = pct(one_client_latency(layer.url, PATH, layer.headers, small, latency_requests), 0.5)
        before = tree_cpu_seconds(layer.pid)  # a process and its workers (make bench WORKERS=N)
        wrk = run_wrk(layer.url + PATH, layer.headers, small, 32, duration, None)
        cpu = (tree_cpu_seconds(layer.pid) - before) / max(wrk.requests, 1)
        s = streams(layer.url + PATH, layer.headers, paced_body, 4, PACED_STREAMS)
        first = f"{(pct(s.ttfe, 0.5) - d50) * 1e3:+.2f} / {(pct(s.ttfe, 0.99) - d99) * 1e3:+.2f} ms"
        lines.append(
            f"{layer.name:<24}{(p50 - direct_p50) * 1e6:>+19,.0f} us{cpu * 1e6:>12,.0f} us{wrk.rps:>12,.0f}{first:>34}"
        )
    lines.append(
        f"(DIRECT: p50 {direct_p50 * 1e6:,.0f} us, first event p50 {d50 * 1e3:.2f} ms, p99 {d99 * 1e3:.2f} ms)"
    )
    return "\n".join(lines)


__all__ = ["Layer", "floors", "measure_layers"]
