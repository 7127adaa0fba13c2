"""What a request explanation costs a web worker, measured in process (``python bench/explain_micro.py``).

For a route of 2 nodes (the benchmark's fleet) and one of 1,000 (a few of them draining, busy or
behind an open breaker), it times the router's choice and release alone, then the same with an
explanation: the request's share (starting the record, the choice, one attempt, finishing it with a
usage slice of the answer and packing it), of which building the wire record and packing it alone
("wire+pack"), and, with a private redis-server when one is installed, the background loop's
appending batches of 1,000 with one EVAL. Prints the CPU time per request of each part: medians of
``--repeat`` runs.

The buffer is emptied every ``Explainer.batch`` records, as the worker's loop does at the latest: the
garbage collector's work for the records waiting in it is part of what they cost, and it grows with
their number (``--no-drain`` keeps every record of a run instead, the upper bound).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "routerpanel.settings")

import django  # noqa: E402

django.setup()

from nodes.live import explain as live  # noqa: E402
from proxy.attempts import Attempt  # noqa: E402
from proxy.breaker import Breakers  # noqa: E402
from proxy.explain import Explainer, Explanation  # noqa: E402
from proxy.load import LocalLoadTracker  # noqa: E402
from proxy.request import Outcome  # noqa: E402
from proxy.router import Router  # noqa: E402
from proxy.snapshot import KeyView, NodeView, PolicyView, Route, build_routes  # noqa: E402
from proxy.strategies import PrefixIndex  # noqa: E402

ANSWER = (
    b'{"id":"cmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":'
    b'{"role":"assistant","content":"' + b"x" * 200 + b'"},"finish_reason":"length"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":16,"total_tokens":28}}'
)


def make_route(size: int, strategy: str) -> tuple[Route, Router]:
    nodes = {}
    for i in range(1, size + 1):
        state = "draining" if size > 2 and i % 50 == 0 else "active"
        nodes[i] = NodeView(
            id=i,
            url=f"http://10.0.{i // 250}.{i % 250}:8000",
            engine_type="openai",
            role="hybrid",
            state=state,
            health="healthy",
            max_concurrency=1 if size > 2 and i % 40 == 0 else 0,
        )
    routes = build_routes(nodes, [(i, "m", "m") for i in nodes], {}, PolicyView(strategy=strategy))
    router = Router(load=LocalLoadTracker(), prefix_index=PrefixIndex(), breakers=Breakers())
    if size > 2:
        for i in range(40, size + 1, 40):
            router.load.try_acquire(nodes[i])  # at their max concurrency
        for i in range(7, size + 1, 97):
            for _ in range(router.breakers.threshold):
                router.breakers.failure(i, now=time.time() + 3600)  # open for an hour
    return routes["m"], router


def per_call(fn: Callable[[], object], number: int, repeat: int) -> float:
    """CPU seconds per call over ``repeat`` runs of ``number`` calls: the median, or with ``--best``
    the fastest run (what the code costs when no other process competes for the core's caches)."""
    runs = []
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(number):
            fn()
        runs.append((time.process_time() - started) / number)
    return min(runs) if BEST else statistics.median(runs)


BEST = False
DRAIN = True


def measure(size: int, strategy: str, number: int, repeat: int) -> tuple[dict[str, float], bytes]:
    route, router = make_route(size, strategy)
    key = KeyView(id=1, name="bench", allowed_models=frozenset())
    explainer = Explainer(buffer_size=10**9)

    def plain() -> None:  # what a request does anyway: the choice, an attempt, an outcome
        target = router.choose(route, "hybrid")
        assert target is not None
        attempt = Attempt(target)
        attempt.status, attempt.verdict = 200, True
        router.release(target, 0.001, ok=True)
        Outcome(status=200, usage=ANSWER)

    last: list[Explanation] = []

    def explained() -> None:
        started = time.perf_counter()
        explanation = explainer.begin(
            "0123456789abcdef0123456789abcdef", key, "m", "/v1/chat/completions", False, started, False
        )
        assert explanation is not None
        explanation.route = route
        target = router.choose(route, "hybrid", explain=explanation)
        assert target is not None
        attempt = Attempt(target)
        attempt.status, attempt.verdict = 200, True
        explanation.attempted(attempt, 0.001)
        router.release(target, 0.001, ok=True)
        explainer.finish(explanation, Outcome(status=200, usage=ANSWER))
        last[:] = [explanation]
        if DRAIN and len(explainer.buffer) > explainer.batch:
            explainer.buffer.clear()  # the loop's flush takes them
            explainer.ids.clear()

    baseline = per_call(plain, number, repeat)
    with_explain = per_call(explained, number, repeat)
    sample = last[0]
    explainer.buffer.clear()
    explainer.ids.clear()
    wire = per_call(lambda: live.encode(sample.wire()), number, repeat)
    encoded = live.encode(sample.wire())
    return {"choose": baseline, "hot": with_explain - baseline, "wire": wire, "bytes": len(encoded)}, encoded


@contextlib.contextmanager
def private_redis() -> Iterator[int | None]:
    """The port of a redis-server of our own for the ``with`` block, or None when none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    from tests.support.ports import free_port
    from tests.support.procs import running

    port = free_port()
    with (
        tempfile.TemporaryDirectory() as data,
        running([binary, "--port", str(port), "--save", "", "--dir", data], port=port),
    ):
        yield port


def measure_redis(payload: bytes, batches: int) -> float | None:
    """CPU seconds per record of appending batches of 1,000 with one EVAL, or None without redis-server."""
    import redis.asyncio as aioredis

    with private_redis() as port:
        if port is None:
            return None

        async def run() -> float:
            client = aioredis.Redis(port=port)
            records = [(f"{i:032x}", payload) for i in range(1000)]
            await client.eval(*live.append_args(records, max_records=100_000, oldest_ms=0))
            started = time.process_time()
            for _ in range(batches):
                await client.eval(*live.append_args(records, max_records=100_000, oldest_ms=0))
            spent = time.process_time() - started
            await client.aclose()
            return spent / (batches * 1000)

        return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000, help="requests per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the median is shown")
    parser.add_argument("--best", action="store_true", help="show the fastest run instead of the median")
    parser.add_argument("--no-drain", action="store_true", help="keep every record of a run in the buffer")
    args = parser.parse_args()
    global BEST, DRAIN
    BEST = args.best
    DRAIN = not args.no_drain
    kind = "fastest" if BEST else "median"
    drained = "the buffer emptied in batches" if DRAIN else "every record kept"
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {kind} of {args.repeat} runs; {drained}")
    print(f"{'route':<28}{'choose+release':>16}{'explain, request':>20}{'wire+pack':>12}{'record':>9}")
    payload = b""
    for size, strategy in ((2, "round_robin"), (2, "least_requests"), (1000, "least_requests")):
        number = args.number if size == 2 else max(200, args.number // 50)
        figures, encoded = measure(size, strategy, number, args.repeat)
        payload = payload or encoded
        label = f"{size} nodes, {strategy}"
        print(
            f"{label:<28}{figures['choose'] * 1e6:>13.2f} us{figures['hot'] * 1e6:>17.2f} us"
            f"{figures['wire'] * 1e6:>9.2f} us{figures['bytes']:>7.0f} B"
        )
    redis_cost = measure_redis(payload, batches=20)
    if redis_cost is not None:
        print(f"appending to Redis in batches of 1,000 (one EVAL each): {redis_cost * 1e6:.2f} us of CPU per record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
