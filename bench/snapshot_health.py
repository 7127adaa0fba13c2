"""What a web worker spends on the routing snapshot and on the live health, at fleet scale.

    .venv/bin/python bench/snapshot_health.py --nodes 1000 5000

For each fleet size, on a fresh SQLite database (bulk-created: one ``Node`` per engine with its
served-name and model-path aliases) and a private Redis, in two layouts (every node serving one
model, and models of 20 nodes each), the median of ``--repeat`` runs of:

- ``build_snapshot()``: the configuration rebuild (database read and routes), what a worker does
  when the configuration version moves;
- ``with_health()`` for 1 node, 1% and all nodes changing health: the health overlay, what a worker
  does at most once a second under churn instead of a rebuild;
- reading every node's state from Redis and decoding it (``LiveHealth.refresh``), done only when
  the health version moved; and, for comparison, the same states as a Redis hash (the first design:
  redis-py parses every field on the event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def median_ms(func: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        func()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def populate(nodes: int, per_model: int) -> None:
    from nodes.models import ModelAlias, Node

    Node.objects.all().delete()
    Node.objects.bulk_create(
        [Node(url=f"http://10.{i // 65536}.{i // 256 % 256}.{i % 256}:8000", health="healthy") for i in range(nodes)]
    )
    aliases = []
    for index, node_id in enumerate(Node.objects.order_by("id").values_list("id", flat=True)):
        model = f"model-{index // per_model}"
        aliases.append(ModelAlias(node_id=node_id, name=model, served_name=model, origin="served"))
        aliases.append(ModelAlias(node_id=node_id, name=f"/models/{model}", served_name=model, origin="path"))
    ModelAlias.objects.bulk_create(aliases, batch_size=2000)


def measure(nodes: int, per_model: int, repeat: int, redis_url: str) -> dict[str, float]:
    import redis as redis_lib
    import redis.asyncio as aioredis

    from nodes.live import keys
    from nodes.live.health import decode_states, encode_states
    from proxy.health import LiveHealth
    from proxy.snapshot import build_snapshot, with_health

    populate(nodes, per_model)
    figures = {"build_snapshot": median_ms(build_snapshot, repeat)}
    snap = build_snapshot()
    ids = sorted(snap.nodes)
    one = {ids[0]: "unhealthy"}
    percent = {node_id: "unhealthy" for node_id in ids[:: max(1, nodes // (nodes // 100 or 1))][: max(1, nodes // 100)]}
    every = {node_id: "unhealthy" for node_id in ids}
    figures["overlay_1_node"] = median_ms(lambda: with_health(snap, one), repeat)
    figures["overlay_1%"] = median_ms(lambda: with_health(snap, percent), repeat)
    figures["overlay_all"] = median_ms(lambda: with_health(snap, every), repeat)

    client = redis_lib.Redis.from_url(redis_url)
    client.set(keys.HEALTH_STATES, encode_states(dict.fromkeys(ids, "healthy")))
    figures["decode_states"] = median_ms(lambda: decode_states(client.get(keys.HEALTH_STATES)), repeat)
    client.delete("bench:states-hash")
    client.hset("bench:states-hash", mapping={str(node_id): "healthy" for node_id in ids})

    async def hash_cost() -> float:
        aclient = aioredis.Redis.from_url(redis_url)
        samples = []
        for _ in range(repeat):
            started = time.perf_counter()
            raw = await aclient.hgetall("bench:states-hash")
            {int(k): v.decode() if isinstance(v, bytes) else v for k, v in raw.items()}
            samples.append((time.perf_counter() - started) * 1000)
        await aclient.aclose()
        return statistics.median(samples)

    figures["as_a_hash_read_and_parse"] = asyncio.run(hash_cost())

    async def refresh_cost() -> float:
        aclient = aioredis.Redis.from_url(redis_url)
        health = LiveHealth()
        samples = []
        for version in range(repeat):
            started = time.perf_counter()
            await health.refresh(aclient, str(version).encode())
            samples.append((time.perf_counter() - started) * 1000)
        await aclient.aclose()
        return statistics.median(samples)

    figures["redis_read_and_parse"] = asyncio.run(refresh_cost())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--repeat", type=int, default=7)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        from nodes.localredis import redis_server_argv
        from tests.support.ports import free_port
        from tests.support.procs import wait_for_port

        port = free_port()
        redis_proc = subprocess.Popen(redis_server_argv(port=port, data_dir=tmp), stdout=subprocess.DEVNULL)
        redis_url = f"redis://127.0.0.1:{port}/0"
        os.environ.update(
            DJANGO_SETTINGS_MODULE="routerpanel.settings",
            ROUTERPANEL_SQLITE_PATH=f"{tmp}/db.sqlite3",
            ROUTERPANEL_REDIS_URL=redis_url,
            ROUTERPANEL_LOG_LEVEL="WARNING",
        )
        try:
            wait_for_port(port, proc=redis_proc)
            import django
            from django.core.management import call_command

            django.setup()
            call_command("migrate", verbosity=0)
            for nodes in options.nodes:
                for per_model, layout in ((nodes, "one model on every node"), (20, "models of 20 nodes")):
                    figures = measure(nodes, per_model, options.repeat, redis_url)
                    shown = ", ".join(f"{name} {value:.1f} ms" for name, value in figures.items())
                    print(f"{nodes} nodes, {layout}: {shown}", flush=True)
        finally:
            redis_proc.terminate()
            redis_proc.wait()
    load = os.getloadavg()
    print(f"machine load average during the run: {load[0]:.1f} / {load[1]:.1f} (1 / 5 min), {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
