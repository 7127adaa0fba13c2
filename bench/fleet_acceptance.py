"""The fleet acceptance run: N simulated engines registering through NanoCtrl next to a whole
RouterPanel stack, minutes of traffic, one engine killed and restarted (``make bench-fleet-acceptance``).

    .venv/bin/python bench/fleet_acceptance.py --nodes 1000 --seconds 600

Starts what ``make run`` starts, each in its own process: Redis, NanoCtrl, the web process (one
uvicorn worker), a Celery worker and beat (the registry sync), the registry listener and the prober
(tests/support/stack.py). A control plane is added for a scope of its own; then N - 1 engines in
one ``enginesim --fleet`` process and one engine in a process of its own register themselves with
NanoCtrl, all serving ``fleet-model``. Printed:

- registration to routable: from the engines' start until the registry holds all N, until the
  prober has found all N healthy, and until ``/v1/models`` lists the model (the lone engine:
  from its start until a request was answered by it, through the explanation header);
- over ``--seconds`` of back-to-back requests to ``fleet-model`` (one client): the answers by status
  (none should be refused for want of a node), the fleet engines that changed state (false
  unhealthy transitions: none should), the prober's CPU (share of one core, from /proc) and the
  time between two probes of a node (its status), the web process's CPU per request and its RSS;
- a minute in: the lone engine SIGKILLed, the seconds until the prober marks it unhealthy (its
  window: failures x interval + timeout + flush, plus 1.5 s of slack), then restarted on its port, the seconds until it
  is healthy again.

Snapshot build times at 1,000 and 5,000 nodes are ``bench/snapshot_health.py``'s; the prober alone at
5,000 is ``bench/prober_fleet.py --nodes 5000``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.prober_fleet import cpu_times, rss_mib  # noqa: E402
from enginesim.testing import Simulator, run_fleet, run_simulator  # noqa: E402
from nodes.live import health as live_health  # noqa: E402
from nodes.live.health import read_states_sync  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.procs import RedisServer  # noqa: E402
from tests.support.stack import PROXY_KEY, RouterPanelStack, StackPool, StackSpec  # noqa: E402
from tests.support.traffic import Traffic  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402

MODEL = "fleet-model"


def pid_of(stack: RouterPanelStack, needle: str) -> int:
    """The process of ``stack`` whose command line holds ``needle`` (found by its SQLite path)."""
    database = f"ROUTERPANEL_SQLITE_PATH={stack.database}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle.encode() in (entry / "cmdline").read_bytes() and database in (entry / "environ").read_bytes():
                return int(entry.name)
    raise LookupError(f"no {needle} process for {stack.database}")


def timed(condition: Callable[[], object], timeout: float, message: str) -> float:
    started = time.monotonic()
    wait_until(condition, timeout, message, interval=0.05)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--interval", type=float, default=5.0, help="ROUTERPANEL_HEALTH_INTERVAL")
    parser.add_argument("--timeout", type=float, default=1.0, help="ROUTERPANEL_HEALTH_TIMEOUT")
    parser.add_argument("--failures", type=int, default=2, help="ROUTERPANEL_HEALTH_FAILURES")
    parser.add_argument("--sync-interval", type=int, default=5, help="the control plane's sync interval")
    options = parser.parse_args()
    flush = 0.5
    window = options.failures * options.interval + options.timeout + flush
    spec = StackSpec(
        celery=True,
        listener=True,
        prober=True,
        nanoctrl=True,
        settings={
            "ROUTERPANEL_HEALTH_INTERVAL": str(options.interval),
            "ROUTERPANEL_HEALTH_TIMEOUT": str(options.timeout),
            "ROUTERPANEL_HEALTH_FAILURES": str(options.failures),
            "ROUTERPANEL_PROBER_FLUSH_INTERVAL": str(flush),
            "ROUTERPANEL_REGISTRY_TIMEOUT": "5",
        },
    )
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        server = RedisServer(Path(tmp), databases=32).start()
        running.callback(server.stop)
        pool = StackPool(Path(tmp), server)
        running.callback(pool.close)
        stack = pool.get(spec)
        nanoctrl = stack.nanoctrl
        assert nanoctrl is not None
        scope = "fleet"
        body = {
            "name": scope,
            "address": nanoctrl.address,
            "scope": scope,
            "sync_interval": options.sync_interval,
            "redis_url": nanoctrl.redis_url + "/0",
        }
        created = stack.api.post("/api/control-planes/", json=body)
        assert created.status_code == 201, created.text
        events = redis.Redis.from_url(nanoctrl.redis_url)
        channel = f"{scope}:nano_events:service_update"
        wait_until(lambda: events.pubsub_numsub(channel)[0][1] >= 1, 30, "the listener never subscribed")
        ctrl = [f"--ctrl-address={nanoctrl.address}", f"--ctrl-scope={scope}", "--heartbeat-interval=5"]
        client = redis.Redis.from_url(stack.env["ROUTERPANEL_REDIS_URL"])
        lone_port = free_port()

        def run_lone() -> contextlib.AbstractContextManager[Simulator]:
            return run_simulator(engine="nanodeploy", served_model_name=MODEL, port=lone_port, extra_args=ctrl)

        def node_count() -> int:
            return int(stack.api.get("/api/nodes/", params={"limit": 1}).json()["count"])

        def healthy_count() -> int:
            return sum(1 for state in (read_states_sync(client) or {}).values() if state == "healthy")

        def listed() -> bool:
            models = httpx.get(stack.v1 + "/models", headers={"Authorization": f"Bearer {PROXY_KEY}"}, timeout=10)
            return MODEL in {m["id"] for m in models.json()["data"]}

        started = time.monotonic()
        fleet = running.enter_context(
            run_fleet(options.nodes - 1, engine="nanodeploy", served_model_name=MODEL, extra_args=ctrl)
        )
        lone_cm = run_lone()
        lone = lone_cm.__enter__()
        running.callback(lambda: lone_cm.__exit__(None, None, None))
        figures["engines listening after"] = time.monotonic() - started
        budget = 120 + options.nodes / 10
        wait_until(
            lambda: node_count() >= options.nodes,
            budget,
            lambda: f"the registry holds {node_count()} nodes, NanoCtrl {len(nanoctrl.entities(scope))} engines",
            interval=0.1,
        )
        figures["all in the registry after"] = time.monotonic() - started
        wait_until(lambda: healthy_count() >= options.nodes, budget, "never all healthy", interval=0.1)
        figures["all healthy (routable) after"] = time.monotonic() - started
        wait_until(listed, 30, "the model never listed", interval=0.1)
        figures["listed by /v1/models after"] = time.monotonic() - started
        ids: dict[str, int] = {}
        page: str | None = "/api/nodes/?limit=500"
        while page:
            answer = stack.api.get(page).json()
            ids.update({n["url"]: n["id"] for n in answer["results"]})
            page = answer["next"]
        missing = [u for u in [*fleet.urls, lone.url] if u not in ids]
        assert not missing, f"{len(missing)} engines have no node, e.g. {missing[:3]}; {len(ids)} nodes"
        lone_id = ids[lone.url]
        fleet_ids = [ids[u] for u in fleet.urls]

        prober_pid, web_pid = pid_of(stack, "run_prober"), pid_of(stack, "uvicorn")
        status_before = json.loads(client.get("routerpanel:prober:status") or "{}")
        prober_cpu, web_cpu, wall = sum(cpu_times(prober_pid)), sum(cpu_times(web_pid)), time.monotonic()
        sampled_from = time.time()
        traffic = Traffic(stack.base, MODEL, PROXY_KEY)
        traffic.start()
        try:
            time.sleep(min(60.0, options.seconds / 4))
            lone.proc.send_signal(signal.SIGKILL)
            lone.proc.wait()
            state = lambda wanted: lambda: (read_states_sync(client) or {}).get(lone_id) == wanted  # noqa: E731
            figures["killed engine unhealthy after"] = timed(state("unhealthy"), 60, "never ejected")
            restarted = running.enter_context(run_lone())
            assert restarted.url == lone.url
            figures["restarted engine healthy after"] = timed(state("healthy"), 60, "never readmitted")
            time.sleep(max(0.0, options.seconds - (time.monotonic() - wall)))
        finally:
            traffic.stop.set()
            traffic.join(timeout=30)
        wall = time.monotonic() - wall
        prober_cpu = sum(cpu_times(prober_pid)) - prober_cpu
        web_cpu = sum(cpu_times(web_pid)) - web_cpu
        web_rss = rss_mib(web_pid)
        status = json.loads(client.get("routerpanel:prober:status") or "{}")
        records = live_health.read_records_sync(client) or {}
        flapped = [
            i for i in fleet_ids if i in records and (records[i].state != "healthy" or records[i].since > sampled_from)
        ]
        registry = node_count()
        moved = {i: (r.state, round(r.since - sampled_from, 1)) for i, r in records.items() if r.since > sampled_from}
        failed_probes: dict[str, int] = {}  # failed probes in the nodes' recent history, by what they said
        for node_id in ids.values():
            for raw in client.lrange(f"routerpanel:health:{node_id}", 0, -1):
                entry = json.loads(raw)
                if entry["t"] > sampled_from and entry["ok"] is False:
                    reason = entry["detail"].split(":")[0]
                    failed_probes[reason] = failed_probes.get(reason, 0) + 1

    requests = sum(traffic.answers.values())
    counts = {k: status["counts"].get(k, 0) - status_before.get("counts", {}).get(k, 0) for k in status["counts"]}
    ways = ", ".join(f"{k.replace('_to_', ' to ')} {v}" for k, v in sorted(counts.items()) if "_to_" in k and v)
    print(f"\nfleet acceptance: {options.nodes} engines through NanoCtrl, {wall:.0f} s of traffic")
    for name, value in figures.items():
        print(f"  {name}: {value:.1f} s")
    print(f"  ejection window (failures x interval + timeout + flush): {window:.1f} s")
    print(f"  requests: {requests}, {dict(traffic.answers)}")
    print(f"  false transitions (fleet engines that changed state while sampled): {len(flapped)}")
    print(f"  nodes in the registry at the end: {registry}")
    print(f"  nodes whose state changed while sampled (the killed one's included): {moved}")
    print(f"  failed probes kept in the nodes' histories, by reason: {failed_probes}")
    print(
        f"  prober: {prober_cpu / wall * 100:.1f}% of one core; probes {counts.get('sent', 0)} "
        f"({counts.get('sent', 0) / wall:.0f}/s), fail {counts.get('fail', 0)}, void {counts.get('void', 0)}, "
        f"transitions {counts.get('transitions', 0)} ({ways}); "
        f"time between two probes of a node {status.get('period')}; "
        f"loop lag {status.get('loop_lag')}"
    )
    print(
        f"  web process (one uvicorn worker): {web_cpu / max(requests, 1) * 1e6:.0f} µs of CPU per request, "
        f"RSS {web_rss:.0f} MiB at the end"
    )
    load = os.getloadavg()
    print(f"  machine load average at the end: {load[0]:.1f} / {load[1]:.1f} (1 / 5 min), {os.cpu_count()} cores")
    failed = [code for code in traffic.answers if code != "200"]
    late = figures["killed engine unhealthy after"] > window + 1.5  # scheduling slack on a loaded machine
    # The prober's own count: only the killed engine may have turned unhealthy (once).
    ejected = counts.get("healthy_to_unhealthy", 0)
    if flapped or failed or late or ejected > 1:
        sys.exit(
            f"not accepted: {len(flapped)} false transitions ({ejected} ejections counted by the prober), "
            f"answers other than 200: {failed}, late: {late}"
        )


if __name__ == "__main__":
    main()
