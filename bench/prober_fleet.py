"""The prober against a fleet of N simulated engines in one process: its CPU, its rounds, its verdicts.

    .venv/bin/python bench/prober_fleet.py --nodes 1000 --interval 5 --seconds 60

Starts a private Redis, a fleet of N fast simulated engines (one ``enginesim --fleet`` process), a
fresh SQLite database holding N healthy nodes (bulk-created: this measures the prober, not the
registry), and ``manage.py run_prober``. After a warm-up it samples, over ``--seconds``:

- the prober's CPU time (``/proc/PID/stat``, so other load on the machine does not inflate it), as a
  share of one core and per probe;
- probes sent, void (late or explained by the prober's own loop lag) and failed, transitions
  (every one is false: no engine is stopped), and the prober's loop lag (its status key);
- the achieved period per node (the time between two probes of one node, from the prober's status);
- a burst round: the time one aiohttp session at the prober's concurrency takes to probe all N once
  (what the old per-second task did every round), for comparison.

``--stop-one`` also SIGSTOPs (or, with ``--kill``, SIGKILLs) an engine run in its own process and
reports when it was marked unhealthy and, after it resumes, healthy again. ``--traffic`` also runs
RouterPanel's web process (one uvicorn worker) and sends back-to-back requests through it to the
model every fleet engine serves for the whole sample, counting the answers by status: none should
be refused for want of a node, and no fleet engine should change state (false transitions). It also
registers one more engine through the REST API and times it from the POST to its first routed
request, and reports the web process's CPU per request and its memory (RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from enginesim.testing import run_fleet, run_simulator  # noqa: E402
from nodes.live import health as live_health  # noqa: E402
from nodes.live.health import read_states_sync  # noqa: E402
from nodes.localredis import redis_server_argv  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.procs import PYTHON, output_of, running, web_argv  # noqa: E402
from tests.support.traffic import Traffic  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_KEY = "rp-bench-fleet-key"
API_TOKEN = "bench-fleet-token-0000000000000000000000"


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def registration_to_routable(base: str, url: str) -> float:
    """Seconds from posting a new node to the REST API until ``/v1`` routes a request to it (the API
    probes a new node at once; the web worker applies the live health within a second)."""
    api = {"Authorization": f"Bearer {API_TOKEN}"}
    started = time.monotonic()
    added = httpx.post(base + "/api/nodes/", json={"url": url, "models": ["joined-model"]}, headers=api, timeout=30)
    assert added.status_code == 201, added.text
    body = {"model": "joined-model", "prompt": "hello", "max_tokens": 1}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {PROXY_KEY}"}, timeout=10) as client:
        while client.post("/v1/completions", json=body).status_code != 200:
            if time.monotonic() - started > 30:
                raise TimeoutError(f"{url} not routable within 30 s")
            time.sleep(0.01)
    return time.monotonic() - started


def setup_database(env: dict[str, str], urls: list[str], model: str) -> dict[str, int]:
    """Migrate, bootstrap (the proxy key), and bulk-create one healthy node per URL, all serving
    ``model``; returns url -> id."""
    subprocess.run([PYTHON, "manage.py", "migrate", "--noinput", "-v0"], cwd=REPO, env=env, check=True)
    subprocess.run([PYTHON, "manage.py", "bootstrap"], cwd=REPO, env=env, check=True, capture_output=True)
    script = (
        "import json, sys\n"
        "from nodes.models import ModelAlias, Node\n"
        "urls = json.load(sys.stdin)\n"
        "Node.objects.bulk_create([Node(url=u, engine_type='openai', health='healthy') for u in urls])\n"
        "ids = dict(Node.objects.values_list('url', 'id'))\n"
        f"ModelAlias.objects.bulk_create([ModelAlias(node_id=i, name={model!r}, served_name={model!r}, origin='served')"
        " for i in ids.values()])\n"
        "print(json.dumps(ids))\n"
    )
    result = subprocess.run(
        [PYTHON, "manage.py", "shell", "-c", script],
        cwd=REPO,
        env=env,
        input=json.dumps(urls),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


async def burst_round(urls: list[str], concurrency: int) -> float:
    """Seconds to probe every URL once with one session (a warm pool: the second of two rounds)."""
    from nodes.prober import client

    session = client.new_session(limit=concurrency, keepalive=60)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(url: str) -> str:
        async with semaphore:
            return (await client.probe(session, url + "/health", 5.0))[0]

    try:
        await asyncio.gather(*(one(u) for u in urls))
        started = time.perf_counter()
        kinds = await asyncio.gather(*(one(u) for u in urls))
        took = time.perf_counter() - started
    finally:
        await session.close()
    assert all(k == "ok" for k in kinds), kinds
    return took


def wait_for_state(client: redis.Redis, node_id: int, state: str, timeout: float) -> float:
    started = time.monotonic()
    while (read_states_sync(client) or {}).get(node_id) != state:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"node {node_id} not {state} within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--failures", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--stop-one", action="store_true", help="stop one more engine, run in its own process")
    parser.add_argument("--kill", action="store_true", help="with --stop-one: SIGKILL instead of SIGSTOP")
    parser.add_argument("--profile", metavar="PATH", help="run the prober under cProfile, writing its stats to PATH")
    parser.add_argument("--traffic", action="store_true", help="send back-to-back /v1 requests through a web process")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        redis_port = free_port()
        redis_proc = subprocess.Popen(redis_server_argv(port=redis_port, data_dir=tmp), stdout=subprocess.DEVNULL)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        env = {
            **os.environ,
            "ROUTERPANEL_SQLITE_PATH": f"{tmp}/db.sqlite3",
            "ROUTERPANEL_REDIS_URL": redis_url,
            "ROUTERPANEL_HEALTH_INTERVAL": str(options.interval),
            "ROUTERPANEL_HEALTH_TIMEOUT": str(options.timeout),
            "ROUTERPANEL_HEALTH_FAILURES": str(options.failures),
            "ROUTERPANEL_LOG_LEVEL": "WARNING",
            "ROUTERPANEL_DEMO_API_KEY": PROXY_KEY,
            "ROUTERPANEL_API_TOKEN": API_TOKEN,
            "ROUTERPANEL_ADMIN_PASSWORD": "bench-fleet-admin",
        }
        try:
            with (
                run_fleet(options.nodes, served_model_name="fleet-model") as fleet,
                run_simulator(served_model_name="fleet-model") as lone,
                run_simulator(served_model_name="joined-model") as joiner,
            ):
                urls = fleet.urls + ([lone.url] if options.stop_one else [])
                ids = setup_database(env, urls, "fleet-model")
                burst = asyncio.run(burst_round(fleet.urls, 512))
                client = redis.Redis.from_url(redis_url)
                profile = ["-m", "cProfile", "-o", options.profile] if options.profile else []
                web_port = free_port()
                web = running(web_argv(web_port), port=web_port, env=env, timeout=60) if options.traffic else None
                traffic = Traffic(f"http://127.0.0.1:{web_port}", "fleet-model", PROXY_KEY) if options.traffic else None
                with (
                    running([PYTHON, *profile, "manage.py", "run_prober"], env=env) as prober,
                    web if web is not None else contextlib.nullcontext() as web_proc,
                ):
                    time.sleep(options.warmup)
                    status = client.get("routerpanel:prober:status")
                    if status is None:
                        raise RuntimeError(f"the prober publishes no status:\n{output_of(prober)[-3000:]}")
                    before = json.loads(status)
                    figures: dict[str, float] = {}
                    if web_proc is not None:
                        figures["registration_to_routable_s"] = registration_to_routable(
                            f"http://127.0.0.1:{web_port}", joiner.url
                        )
                        web_cpu_before = sum(cpu_times(web_proc.pid))
                    cpu_before, wall_before, sampled_from = cpu_times(prober.pid), time.monotonic(), time.time()
                    if traffic is not None:
                        traffic.start()
                    if options.stop_one:
                        lone_id = ids[lone.url]
                        lone.proc.send_signal(signal.SIGKILL if options.kill else signal.SIGSTOP)
                        figures["ejected_after_s"] = wait_for_state(client, lone_id, "unhealthy", 30)
                        if options.kill:
                            lone.proc.wait()
                        else:
                            lone.proc.send_signal(signal.SIGCONT)
                            figures["readmitted_after_s"] = wait_for_state(client, lone_id, "healthy", 30)
                    time.sleep(max(0.0, options.seconds - (time.monotonic() - wall_before)))
                    if traffic is not None:
                        traffic.stop.set()
                        traffic.join(timeout=30)
                    if web_proc is not None:
                        web_cpu, web_rss = sum(cpu_times(web_proc.pid)) - web_cpu_before, rss_mib(web_proc.pid)
                    user, system = (b - a for a, b in zip(cpu_before, cpu_times(prober.pid), strict=True))
                    cpu = user + system
                    wall = time.monotonic() - wall_before
                    after = json.loads(client.get("routerpanel:prober:status") or "{}")
                states = {str(k): v for k, v in (read_states_sync(client) or {}).items()}
                records = live_health.read_records_sync(client) or {}
                flapped = [
                    node_id
                    for node_id in (ids[u] for u in fleet.urls)
                    if node_id in records
                    and (records[node_id].state != "healthy" or records[node_id].since > sampled_from)
                ]
                voids: dict[str, int] = {}
                for node_id in ids.values():
                    for raw in client.lrange(f"routerpanel:health:{node_id}", 0, -1):
                        detail = json.loads(raw)["detail"]
                        if detail.startswith("void"):
                            reason = detail.split(":")[1].split(" due ")[0].split(" waited ")[0].strip()
                            voids[reason] = voids.get(reason, 0) + 1
        finally:
            redis_proc.terminate()
            redis_proc.wait()

    counts = {k: after["counts"].get(k, 0) - before["counts"].get(k, 0) for k in after["counts"]}
    sent = counts.get("sent", 0)
    fleet_ids = {str(ids[u]) for u in fleet.urls}
    unhealthy = sum(1 for node_id, state in states.items() if node_id in fleet_ids and state != "healthy")
    print(f"\nprober against {options.nodes} engines, {options.interval:g} s interval, {wall:.0f} s sampled")
    share = f"{user / wall * 100:.1f}% user, {system / wall * 100:.1f}% system"
    print(f"  CPU: {cpu / wall * 100:.1f}% of one core ({share}); {cpu / max(sent, 1) * 1e6:.0f} µs per probe")
    print(
        f"  probes sent: {sent} ({sent / wall:.0f}/s); judged ok {counts.get('ok', 0)}, fail {counts.get('fail', 0)}, "
        f"void {counts.get('void', 0)} (late {counts.get('late', 0)}); transitions {counts.get('transitions', 0)}; "
        f"connections opened {counts.get('connections_opened', 0)} ({after['counts'].get('connections_opened')} in all)"
    )
    print(f"  loop lag: {after['loop_lag']}; last flush {after['last_flush_ms']} ms")
    print(f"  time between two probes of a node: {after['period']}")
    print(f"  burst round (all {options.nodes} once, one session, 512 in flight): {burst * 1000:.0f} ms")
    print(f"  fleet engines not healthy at the end: {unhealthy}; void probes in the history by reason: {voids}")
    print(f"  fleet engines that changed state while sampled (false transitions): {len(flapped)}")
    if traffic is not None:
        requests = sum(traffic.answers.values())
        print(f"  traffic through the web process: {requests} requests, {dict(traffic.answers)}")
        print(
            f"  web process (one uvicorn worker): {web_cpu / max(requests, 1) * 1e6:.0f} µs of CPU per request "
            f"(its background loop included), RSS {web_rss:.0f} MiB at the end"
        )
    for name, value in figures.items():
        print(f"  {name.replace('_', ' ').removesuffix(' s')}: {value:.2f} s")
    load = os.getloadavg()
    print(f"  machine load average during the run: {load[0]:.1f} / {load[1]:.1f} (1 / 5 min), {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
