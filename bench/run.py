"""RouterPanel's data-path benchmark (``make bench``): DIRECT vs through the proxy, in one run.

Starts a private Redis, two simulated engines in fast mode (plus one paced at 5 ms per token for
the time-to-first-event test, and one that streams unpaced but writes each event as an HTTP chunk of
its own, as real engines do), and RouterPanel under uvicorn on a fresh SQLite database. Then:

- one client, non-streaming: latency p50/p99 (keep-alive, sequential requests);
- wrk at concurrency 32 and 128: requests/s and errors; CPU µs per request and peak RSS of the web
  process (from /proc/PID/stat and /proc/PID/status);
- 64-chunk streams, unpaced and at 5 ms pacing: time to first event p50/p99 and chunks/s; unpaced
  with a chunk per event: chunks/s and the web worker's CPU per event.

DIRECT sends the same load straight to one engine. Prints absolute figures, ratios to DIRECT and, in
the last column, the data path's targets. Needs wrk (Debian: ``apt-get install -y wrk``). Runs in
about a minute.

With ``--peers`` (``make bench PEERS=1``) it then runs the same phases against vllm-router and
sglang-router in front of the same engines (bench/peers.py) and prints every system side by side
with its ratios to DIRECT, then the two figures the targets compare with a peer once more, head to
head (every system in turn, round by round): about three minutes. With ``--pd`` (``make bench PD=1``) it adds a
prefill/decode pair of simulated engines and the CPU per PD request beside a hybrid one's (bench/pd.py).

With ``--workers N`` (``make bench WORKERS=N``) RouterPanel runs under ``uvicorn --workers N``: the
CPU per request sums the master and every worker process, the peak RSS is given for the largest
worker and for all of them together, and the wrk rows also say how many cores the web processes,
wrk, the engines and Redis used (on a small machine they share the cores, which bounds the scaling).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.floors import Layer, floors, measure_layers  # noqa: E402
from bench.measure import (  # noqa: E402
    PACED_STREAMS,
    UNPACED_SECONDS,
    chat_body,
    cpu_seconds,
    one_client_latency,
    pct,
    peak_rss_mb,
    run_wrk,
    streams,
    tree_cpu_seconds,
    worker_rss_mb,
)
from bench.pd import measure_pd, pd_engines, register  # noqa: E402
from bench.pd import rounds as pd_rounds  # noqa: E402
from bench.peers import (  # noqa: E402
    HEAD_TO_HEAD_ROUNDS,
    PEERS,
    Contender,
    Figures,
    as_json,
    comparison,
    head_to_head,
    head_to_head_table,
    measure_peer,
    peer_router,
)
from bench.webenv import API_TOKEN, MODEL, PROXY_KEY, prepare_database, production_env  # noqa: E402
from enginesim.testing import Simulator, run_simulator  # noqa: E402
from nodes.localredis import redis_server_argv  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.procs import PYTHON, running, web_argv  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402

PACED = "paced-model"
# A fast engine sends a whole stream as one chunk (enginesim's fast mode caches answers); real engines
# write each event as it is made. The "chunk per event" streams measure that kind of relay.
EVENTED = "evented-model"


# -- the run -----------------------------------------------------------------------------------


def cores_text(cores: dict[str, float]) -> str:
    """``run_wrk``'s cores used per process tree, as the report prints them."""
    return " ".join(f"{name} {used:.2f}" for name, used in cores.items())


def setup_registry(
    base: str, fast: list[str], single: dict[str, str], pd: tuple[Simulator, Simulator] | None, workers: int
) -> None:
    """Register ``fast`` for the bench's model, each of ``single`` (model: URL) for its model, and
    the PD pair; wait until every worker lists the models."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10) as api:
        if pd is not None:
            register(api, *pd)
        for url in fast:
            api.post("/api/nodes/", json={"url": url, "models": [MODEL], "engine_type": "openai"}).raise_for_status()
        for model, url in single.items():
            api.post("/api/nodes/", json={"url": url, "models": [model], "engine_type": "openai"}).raise_for_status()

        def listed() -> set[str]:
            models = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {PROXY_KEY}"}).json()
            return {m["id"] for m in models.get("data", [])}

        # Each worker has its own snapshot: new connections land on any of them, so several in a row must list.
        def all_listed() -> bool:
            return all(listed() >= {MODEL, *single} for _ in range(4 * workers))

        wait_until(all_listed, 10 + 5 * workers, "the proxy never listed the benchmark models")


def main() -> int:
    parser = argparse.ArgumentParser(description="DIRECT vs proxy benchmark of the data path")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--latency-requests", type=int, default=2000)
    parser.add_argument("--server", choices=["uvicorn", "daphne"], default="uvicorn")
    parser.add_argument("--peers", action="store_true", help="also vllm-router and sglang-router (make peers-env)")
    parser.add_argument("--pd", action="store_true", help="also prefill/decode requests (bench/pd.py)")
    parser.add_argument("--floors", action="store_true", help="also the cost of each layer (bench/floors.py)")
    parser.add_argument("--workers", type=int, default=1, help="RouterPanel's uvicorn worker processes")
    args = parser.parse_args()
    missing = [peer.name for peer in PEERS if args.peers and not peer.installed()]
    if missing:
        print(f"not installed: {', '.join(missing)}; run make peers-env", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="routerpanel-bench-"))
    redis_port, web_port = free_port(), free_port()
    env = production_env(tmp, redis_port)
    prepare_database(env)
    web_command = web_argv(web_port, server=args.server, workers=args.workers)
    if args.server == "uvicorn":
        web_command.append("--log-level=warning")
    auth = {"Authorization": f"Bearer {PROXY_KEY}"}
    rows: list[tuple[str, str, str, str, str, str]] = []
    fast = ["--fast", "--record-requests=0"]
    # The comparison table's figures per system (bench/peers.py's Figures fields), filled as the phases run.
    figures: dict[str, dict] = {"direct": {}, "floor": {}, "RouterPanel": {}}
    pd_report: dict[str, object] | None = None
    rounds: dict[str, dict[str, list[float]]] | None = None  # head to head with the peers (bench/peers.py)
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(running(redis_server_argv(port=redis_port, data_dir=tmp), port=redis_port))
        sim_a = stack.enter_context(run_simulator(served_model_name=MODEL, extra_args=fast))
        sim_b = stack.enter_context(run_simulator(served_model_name=MODEL, extra_args=fast))
        paced = stack.enter_context(
            run_simulator(served_model_name=PACED, ttft_ms=0, itl_ms=5, extra_args=["--record-requests=0"])
        )
        evented = stack.enter_context(
            run_simulator(served_model_name=EVENTED, ttft_ms=0, itl_ms=0, extra_args=["--record-requests=0"])
        )
        pd = stack.enter_context(pd_engines()) if args.pd else None
        # glibc's malloc arenas limited as the Procfile and docs/deployment.md start web workers.
        web_env = {**env, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
        web = stack.enter_context(running(web_command, port=web_port, env=web_env, timeout=60))
        proxy = f"http://127.0.0.1:{web_port}"
        floor_port = free_port()
        floor_argv = [PYTHON, "-m", "uvicorn", "bench.floor_app:app", "--host=127.0.0.1", f"--port={floor_port}"]
        floor_argv += ["--no-access-log", "--loop=uvloop", "--http=httptools", "--lifespan=off"]
        floor_env = {**env, "FLOOR_UPSTREAMS": f"{MODEL}={sim_a.url},{PACED}={paced.url},{EVENTED}={evented.url}"}
        floor_proc = stack.enter_context(running(floor_argv, port=floor_port, env=floor_env))
        floor = f"http://127.0.0.1:{floor_port}"
        setup_registry(proxy, [sim_a.url, sim_b.url], {PACED: paced.url, EVENTED: evented.url}, pd, args.workers)
        path = "/v1/chat/completions"
        small = chat_body(MODEL, 16)
        workers = f"{args.workers} worker{'s' if args.workers > 1 else ''}"
        print(f"RouterPanel ({args.server}, {workers}) in front of 2 fast simulated engines; DIRECT = one engine;")
        print("floor = a bare ASGI + aiohttp passthrough (bench/floor_app.py) to one engine, for reference.")

        def row(
            metric: str, direct: str = "", through: str = "", ratio: str = "", target: str = "", base: str = ""
        ) -> None:
            rows.append((metric, direct, base, through, ratio, target))

        def us(seconds: float) -> str:
            return f"{seconds * 1e6:,.0f} us"

        def ms(seconds: float) -> str:
            return f"{seconds * 1e3:,.2f} ms"

        def signed(unit: Callable[[float], str], seconds: float) -> str:  # "+5 us", "-1.03 ms" (not "+-1.03 ms")
            return ("+" if seconds >= 0 else "-") + unit(abs(seconds))

        # What the web processes spend with no request at all (each worker's background loops: the
        # snapshot watcher, the shared counters, statistics): a fixed cost per worker.
        idle_before, idle_seconds = tree_cpu_seconds(web.pid), 3.0
        time.sleep(idle_seconds)
        idle_ms = (tree_cpu_seconds(web.pid) - idle_before) / idle_seconds * 1e3
        row("CPU at idle, web processes", through=f"{idle_ms:.1f} ms/s")

        # One client, non-streaming latency (and the web process's CPU per request meanwhile).
        direct_lat = one_client_latency(sim_a.url, path, {}, small, args.latency_requests)
        cpu_before = cpu_seconds(floor_proc.pid)
        floor_lat = one_client_latency(floor, path, {}, small, args.latency_requests)
        floor_cpu = (cpu_seconds(floor_proc.pid) - cpu_before) / (args.latency_requests + 50)
        cpu_before = tree_cpu_seconds(web.pid)
        proxy_lat = one_client_latency(proxy, path, auth, small, args.latency_requests)
        one_client_cpu = (tree_cpu_seconds(web.pid) - cpu_before) / (args.latency_requests + 50)
        for q, target in ((0.5, "<= +300 us"), (0.99, "")):
            d, f, p = pct(direct_lat, q), pct(floor_lat, q), pct(proxy_lat, q)
            row(f"latency p{round(q * 100)}, 1 client", us(d), us(p), signed(us, p - d), target, us(f))
        for system, samples in (("direct", direct_lat), ("floor", floor_lat), ("RouterPanel", proxy_lat)):
            figures[system]["latency_p50"] = pct(samples, 0.5)
        row("CPU per request, 1 client", through=us(one_client_cpu), target="<= 200 us", base=us(floor_cpu))

        # Throughput with wrk; CPU per request of the web processes over the run, and who used the cores.
        watch = {"web": [web.pid], "engines": [sim_a.proc.pid, sim_b.proc.pid], "redis": [redis.pid]}
        for connections in (32, 128):
            direct = run_wrk(sim_a.url + path, {}, small, connections, args.duration, None)
            base = run_wrk(floor + path, {}, small, connections, args.duration, floor_proc.pid)
            through = run_wrk(proxy + path, auth, small, connections, args.duration, web.pid, tree=True, watch=watch)
            ratio = f"{through.rps / direct.rps:.3f}x"
            if connections == 32:
                hybrid_c32 = through
                for system, result in (("direct", direct), ("floor", base), ("RouterPanel", through)):
                    figures[system].update(rps_c32=result.rps, cpu_us_c32=result.cpu_us)
            target = ">= 0.07x" if connections == 32 else ""
            row(
                f"req/s, c={connections}",
                f"{direct.rps:,.0f}",
                f"{through.rps:,.0f}",
                ratio,
                target,
                f"{base.rps:,.0f}",
            )
            target = "0" if connections == 128 else ""
            row(f"errors, c={connections}", str(direct.errors), str(through.errors), "", target, str(base.errors))
            row(
                f"CPU per request, c={connections}",
                through=us((through.cpu_us or 0) / 1e6),
                target="<= 200 us",
                base=us((base.cpu_us or 0) / 1e6),
            )
            row(f"cores used, c={connections}", through=cores_text(through.cores))
        if pd is not None:  # the same load on a prefill/decode model, against the hybrid c=32 figure above
            pd_watch = {**watch, "engines": [pd[0].proc.pid, pd[1].proc.pid]}
            alternated = pd_rounds(
                lambda: measure_pd(proxy, auth, web.pid, pd[0], args.duration, args.workers, pd_watch),
                lambda: run_wrk(proxy + path, auth, small, 32, args.duration, web.pid, tree=True, watch=watch),
                hybrid_c32,
            )
            ratios, user, kernel = alternated.ratios(), alternated.user_ratios(), alternated.kernel_ratios()
            pd_cpu = alternated.median(lambda result: result.cpu_us)
            row("PD: req/s, c=32", through=f"{alternated.median(lambda result: result.rps):,.0f}")
            row("PD: errors, c=32", through=str(sum(run.wrk.errors for run in alternated.pd)), target="0")
            pd_report = {
                "cpu_us": pd_cpu,
                "ratio": statistics.median(ratios),
                "ratios": ratios,
                "user_ratio": statistics.median(user),
                "kernel_ratio": statistics.median(kernel),
            }
            ratio = f"{statistics.median(ratios):.2f}x hybrid"
            row("PD: CPU per request, c=32", through=us(pd_cpu / 1e6), ratio=ratio, target="<= 1.6x hybrid")
            row("PD: x hybrid, each round", through=" / ".join(f"{value:.2f}" for value in ratios))
            pd_kernel = alternated.median(lambda result: result.kernel_us)
            row(
                "PD: user / kernel per request",
                through=f"{us((pd_cpu - pd_kernel) / 1e6)} / {us(pd_kernel / 1e6)}",
                ratio=f"{statistics.median(user):.2f}x / {statistics.median(kernel):.2f}x",
            )
            warmup = alternated.warmup.wrk.cpu_us or 0
            row("PD: CPU per request, not counted (the first run)", through=us(warmup / 1e6))
            row(
                "hybrid, c=32, each round",
                through=" / ".join(us((result.cpu_us or 0) / 1e6) for result in alternated.hybrid),
            )
            pd_cores, hybrid_cores = alternated.cores()
            for name, cores in (("PD", pd_cores), ("hybrid", hybrid_cores)):
                row(f"{name} rounds: cores used", through=cores_text(cores))
            frees = statistics.mean(run.frees_per_call for run in alternated.pd)
            row("PD: KV releases per /pd/free call", through=f"{frees:.1f}")

        # 64-chunk streams: unpaced (chunk throughput, 8 at a time, for a while; the whole stream in
        # one chunk, then a chunk per event) and paced at 5 ms (first event). The last field names
        # the figure the phase gives the comparison with the peers (the chunk-per-event phase none).
        for label, model, engine, concurrency, count, seconds, compared in (
            ("0 ms", MODEL, sim_a.url, 8, 400, UNPACED_SECONDS, "chunks"),
            ("0 ms, a chunk per event", EVENTED, evented.url, 8, 400, UNPACED_SECONDS, None),
            ("5 ms", PACED, paced.url, 4, PACED_STREAMS, 0.0, "first event"),
        ):
            unpaced = seconds > 0
            body = chat_body(model, 64, stream=True)
            ds = streams(engine + path, {}, body, concurrency, count, seconds)
            floor_cpu = tree_cpu_seconds(floor_proc.pid)
            fs = streams(floor + path, {}, body, concurrency, count, seconds)
            floor_cpu = tree_cpu_seconds(floor_proc.pid) - floor_cpu
            proxy_cpu = tree_cpu_seconds(web.pid)
            ps = streams(proxy + path, auth, body, concurrency, count, seconds)
            proxy_cpu = tree_cpu_seconds(web.pid) - proxy_cpu
            fmt = us if unpaced else ms
            for system, stream in (("direct", ds), ("floor", fs), ("RouterPanel", ps)):
                if compared == "chunks":
                    figures[system]["chunks_per_s"] = stream.chunks_per_s
                elif compared == "first event":
                    figures[system].update(
                        first_event_p50=pct(stream.ttfe, 0.5), first_event_p99=pct(stream.ttfe, 0.99)
                    )
            for q in (0.5, 0.99):
                dq, fq, pq = pct(ds.ttfe, q), pct(fs.ttfe, q), pct(ps.ttfe, q)
                target = "<= +1 ms" if compared == "first event" and q == 0.5 else ""
                metric = f"stream {label}: first event p{round(q * 100)}"
                row(metric, fmt(dq), fmt(pq), signed(fmt, pq - dq), target, fmt(fq))
            ratio = f"{ps.chunks_per_s / ds.chunks_per_s:.2f}x"
            row(
                f"stream {label}: chunks/s ({concurrency} streams)",
                f"{ds.chunks_per_s:,.0f}",
                f"{ps.chunks_per_s:,.0f}",
                ratio,
                ">= 0.65x" if compared == "chunks" else "",
                f"{fs.chunks_per_s:,.0f}",
            )
            if unpaced and ps.events and fs.events:
                # What the throughput above hides on a shared machine: the CPU each event cost.
                row(
                    f"stream {label}: CPU per event, web",
                    through=f"{proxy_cpu / ps.events * 1e6:.2f} us",
                    base=f"{floor_cpu / fs.events * 1e6:.2f} us",
                )
            row(f"stream {label}: errors", str(ds.errors), str(ps.errors), base=str(fs.errors))
        largest, total = worker_rss_mb(web.pid)
        row(
            "peak RSS, web process" if args.workers == 1 else "peak RSS, largest web worker",
            through=f"{largest:,.1f} MB",
            target="<= 100 MB",
            base=f"{peak_rss_mb(floor_proc.pid):,.1f} MB",
        )
        if args.workers > 1:
            row(f"peak RSS, master + {args.workers} workers", through=f"{total:,.1f} MB")
        figures["floor"]["rss_mb"] = peak_rss_mb(floor_proc.pid)
        figures["RouterPanel"]["rss_mb"] = largest
        systems = [Figures(system=name, **values) for name, values in figures.items()]
        layers_table = ""
        if args.floors:
            print("measuring the layers...", flush=True)
            with floors(env, floor_env["FLOOR_UPSTREAMS"]) as layers:
                layers += [
                    Layer("ASGI + aiohttp (floor)", floor, floor_proc.pid, {}),
                    Layer("RouterPanel", proxy, web.pid, auth),
                ]
                layers_table = measure_layers(
                    layers, sim_a.url, paced.url, MODEL, PACED, args.duration, args.latency_requests
                )
        if args.peers:  # one router at a time, in front of the same engines, after RouterPanel's phases
            for peer in PEERS:
                print(f"measuring {peer.name}...", flush=True)
                measured = measure_peer(
                    peer,
                    fast=[sim_a.url, sim_b.url],
                    paced=paced.url,
                    model=MODEL,
                    paced_model=PACED,
                    duration=args.duration,
                    latency_requests=args.latency_requests,
                )
                systems.insert(-1, measured)
            # The two figures the targets compare with a peer, again: every system in turn, round by
            # round, so that drift between the phases above cannot decide the comparison.
            print("measuring the systems head to head...", flush=True)
            with contextlib.ExitStack() as peers:
                contenders = [Contender("RouterPanel", proxy, web.pid, auth, tree=True)]
                for peer in PEERS:
                    url, pid = peers.enter_context(peer_router(peer, [sim_a.url, sim_b.url], MODEL))
                    contenders.append(Contender(peer.name, url, pid, {}))
                rounds = head_to_head(
                    contenders,
                    sim_a.url,
                    MODEL,
                    duration=args.duration,
                    latency_requests=args.latency_requests,
                )

    header = ("metric", "DIRECT", "floor", "proxy", "proxy vs DIRECT", "target")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]
    print()
    for line in [header, tuple("-" * w for w in widths), *rows]:
        cells = [
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(cells))
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    saved = results / time.strftime("bench-%Y%m%dT%H%M%SZ.json", time.gmtime())
    if layers_table:
        print("\nwhere the time goes, layer by layer (bench/floors.py):\n")
        print(layers_table)
    if args.peers:
        print(f"\nside by side (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}):\n")
        print(comparison(systems[1:], systems[0]))
    if rounds is not None:
        print(f"\nhead to head ({HEAD_TO_HEAD_ROUNDS} rounds, every system in turn in each):\n")
        print(head_to_head_table(rounds))
    report = {
        "server": args.server,
        "workers": args.workers,
        "load": os.getloadavg(),
        "header": header,
        "rows": rows,
        "systems": as_json(systems),
        "peers": args.peers,
        "pd": pd_report,
        "head_to_head": rounds,
    }
    saved.write_text(json.dumps(report, indent=1))
    print(f"\nsaved to {saved.relative_to(REPO)}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
