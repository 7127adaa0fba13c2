"""What one routing choice costs as the fleet grows, measured in process (``python bench/route_micro.py``).

For every strategy and a route of 2, 10, 100 and 1,000 nodes serving one model, it times the router's
choice and the release of the slot it took (``Router.choose`` then ``Router.release``), alone and with
a request explanation recording the choice (``proxy.explain``). A few nodes are busy (requests in
flight) so the load-aware strategies have something to compare; consistent hashing gets a new
session key per request from a set of 1,000, prefix caching one of 50 prompts. Prints microseconds of
CPU per choice (the median of ``--repeat`` runs) and, per strategy, how the largest route compares
with the smallest: docs/decisions/0009-routing-cost-independent-of-fleet-size.md holds the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "routerpanel.settings")

import django  # noqa: E402

django.setup()

from nodes.choices import Strategy  # noqa: E402
from proxy.breaker import Breakers  # noqa: E402
from proxy.explain import Explanation  # noqa: E402
from proxy.load import LocalLoadTracker  # noqa: E402
from proxy.router import Router  # noqa: E402
from proxy.snapshot import NodeView, PolicyView, Route, build_routes  # noqa: E402
from proxy.strategies import PrefixIndex  # noqa: E402

SIZES = (2, 10, 100, 1000)
PROMPTS = [f"system: you are assistant number {i}. " * 8 + "user: hello" for i in range(50)]


def make_route(size: int, strategy: str) -> tuple[Route, Router]:
    """A route of ``size`` nodes of weights 1 to 3, about eight of them with requests in flight."""
    nodes = {
        i: NodeView(
            id=i,
            url=f"http://10.0.{i // 250}.{i % 250}:8000",
            engine_type="openai",
            role="hybrid",
            state="active",
            health="healthy",
            weight=1 + i % 3,
        )
        for i in range(1, size + 1)
    }
    routes = build_routes(nodes, [(i, "m", "m") for i in nodes], {}, PolicyView(strategy=strategy))
    router = Router(load=LocalLoadTracker(), prefix_index=PrefixIndex(), breakers=Breakers())
    for i in range(1, size + 1, max(1, size // 8)):
        for _ in range(1 + i % 4):
            router.load.try_acquire(nodes[i])
    return routes["m"], router


def setups(size: int, strategy: str) -> tuple[Callable[[int], object], Callable[[int], object]]:
    """The two things timed for a route of ``size`` nodes: (choice + release, the same explained)."""
    route, router = make_route(size, strategy)
    sessions = [{"x-session-id": f"session-{i}"} for i in range(1000)]
    payloads: list[dict[str, Any]] = [{"prompt": prompt} for prompt in PROMPTS]

    def plain(i: int) -> None:
        target = router.choose(route, "hybrid", headers=sessions[i % 1000], payload=payloads[i % 50])
        assert target is not None
        router.release(target, 0.01, ok=True)

    def explained(i: int) -> None:
        explanation = Explanation("0" * 32, None, "m", "/v1/completions", False, 0.0, False)
        explanation.route = route
        target = router.choose(
            route, "hybrid", headers=sessions[i % 1000], payload=payloads[i % 50], explain=explanation
        )
        assert target is not None
        router.release(target, 0.01, ok=True)

    for i in range(200):  # build the per-route table, the ring, the prefix index
        plain(i)
    return plain, explained


def run(fn: Callable[[int], object], number: int) -> float:
    started = time.process_time()
    for i in range(number):
        fn(i)
    return (time.process_time() - started) / number


def measure(sizes: list[int], strategy: str, number: int, repeat: int) -> list[tuple[float, float]]:
    """Per size, (choice + release, the same explained) in seconds of CPU: the median of ``repeat``
    runs, the sizes taking turns within each so that other work on the machine weighs on all alike."""
    timed = [setups(size, strategy) for size in sizes]
    runs: list[list[tuple[float, float]]] = [[] for _ in sizes]
    for _ in range(repeat):
        for i, (plain, explained) in enumerate(timed):
            runs[i].append((run(plain, number), run(explained, number)))
    return [(statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for rs in runs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=5_000, help="choices per run")
    parser.add_argument("--repeat", type=int, default=9, help="runs; the median is shown")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--strategies", nargs="+", default=[s.value for s in Strategy])
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; median of {args.repeat} runs")
    sizes = args.sizes
    header = "".join(f"{n:>10} nodes" for n in sizes)
    print(f"{'us per choice (+ explanation)':<32}{header}{'largest/smallest':>18}")
    worst = 0.0
    for strategy in args.strategies:
        figures = measure(sizes, strategy, args.number, args.repeat)
        plain = [f[0] for f in figures]
        ratio = plain[-1] / plain[0]
        worst = max(worst, ratio)
        print(f"{strategy:<32}" + "".join(f"{p * 1e6:>16.2f}" for p in plain) + f"{ratio:>17.2f}x")
        print(f"{'  with explanation':<32}" + "".join(f"{e * 1e6:>16.2f}" for _, e in figures))
    print(f"worst ratio of the largest route to the smallest: {worst:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
