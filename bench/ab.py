"""``make bench-ab BASE=<rev>``: this tree against another revision, both up at once, round by round.

``make bench`` measures one build, and on a small shared machine the same build's figures move by
a third from one run to the next: a change of a few percent shows only when the two builds run side
by side, in front of the same engines, in alternating rounds. This starts one web worker from this
tree (uncommitted changes included) and one from ``BASE`` (exported with ``git archive`` under
``var/bench-ab/``), both with this checkout's virtualenv, one Redis and one database (so ``BASE``
must have the same migrations), in front of two fast simulated engines. Each round measures both
workers, in alternating order, after an uncounted warm-up round:

- CPU per request of the web worker under wrk at c=32 (non-streaming);
- the latency one client sees, p50 of ``--requests`` requests, beside the engine's own (DIRECT);
- stream chunks/s, 8 unpaced 64-chunk streams at a time;
- with ``--pd``, CPU per prefill/decode request at c=32 (bench/pd.py's pair).

It prints every round, then each figure's medians and in how many rounds this tree did better: a
difference that is not better in most rounds is not one this machine can show.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import chat_body, one_client_latency, pct, run_wrk, streams
from bench.pd import PD_MODEL, measure_pd, pd_engines
from bench.peers import PATH, wait_ready
from bench.run import setup_registry
from bench.webenv import MODEL, PROXY_KEY, prepare_database, production_env
from enginesim.testing import run_simulator
from nodes.localredis import redis_server_argv
from tests.support.ports import free_port
from tests.support.procs import REPO_ROOT, running, web_argv

EXPORTS = REPO_ROOT / "var" / "bench-ab"

# figure: (unit, True when higher is better)
FIGURES: dict[str, tuple[str, bool]] = {
    "CPU per request, c=32": ("us", False),
    "one client p50": ("us", False),
    "stream chunks/s": ("", True),
    "PD: CPU per request, c=32": ("us", False),
}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout.strip()


def export(commit: str) -> Path:
    """``commit``'s files under ``var/bench-ab/<commit>`` (exported once)."""
    tree = EXPORTS / commit
    if not tree.exists():
        EXPORTS.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f"{commit}.", dir=EXPORTS))  # renamed once complete
        try:
            archive = subprocess.run(["git", "archive", commit], cwd=REPO_ROOT, check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(partial)], input=archive.stdout, check=True)
            partial.rename(tree)
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # gone once renamed; a failed export's leftovers
    return tree


def migrations_differ(commit: str) -> list[str]:
    """Migration files that differ between ``commit`` and this tree (both builds share one database)."""
    names = git("diff", "--name-only", commit, "--", "*/migrations/*.py")
    return [name for name in names.splitlines() if name]


def main() -> int:
    parser = argparse.ArgumentParser(description="this tree against BASE, both up at once, round by round")
    parser.add_argument("--base", required=True, help="the revision to compare with (a commit, tag or branch)")
    parser.add_argument("--rounds", type=int, default=6, help="counted rounds (an uncounted warm-up comes first)")
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run")
    parser.add_argument("--requests", type=int, default=1000, help="requests per one-client latency run")
    parser.add_argument("--pd", action="store_true", help="also CPU per prefill/decode request")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 2
    try:
        commit = git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    except subprocess.CalledProcessError as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        print(f"no commit {args.base!r}: {stderr.strip()}", file=sys.stderr)
        return 2
    differ = migrations_differ(commit)
    if differ:
        print(f"{args.base} has other migrations than this tree (one database serves both):", file=sys.stderr)
        print("\n".join(f"  {name}" for name in differ), file=sys.stderr)
        return 2
    base_tree = export(commit)
    builds = {"this tree": REPO_ROOT, f"base {commit[:10]}": base_tree}

    tmp = Path(tempfile.mkdtemp(prefix="routerpanel-bench-ab-"))
    redis_port = free_port()
    env = production_env(tmp, redis_port, MALLOC_ARENA_MAX=os.environ.get("MALLOC_ARENA_MAX", "2"))
    prepare_database(env)
    auth = {"Authorization": f"Bearer {PROXY_KEY}"}
    fast = ["--fast", "--record-requests=0"]
    small, stream_body = chat_body(MODEL, 16), chat_body(MODEL, 64, stream=True)
    figures = [name for name in FIGURES if args.pd or not name.startswith("PD")]
    results: dict[str, dict[str, list[float]]] = {build: {name: [] for name in figures} for build in builds}
    direct_p50: list[float] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(redis_server_argv(port=redis_port, data_dir=tmp), port=redis_port))
        sim_a = stack.enter_context(run_simulator(served_model_name=MODEL, extra_args=fast))
        sim_b = stack.enter_context(run_simulator(served_model_name=MODEL, extra_args=fast))
        pd = stack.enter_context(pd_engines()) if args.pd else None
        workers: dict[str, tuple[int, str]] = {}
        for build, tree in builds.items():
            port = free_port()
            # Each worker imports its own tree's packages first (PYTHONPATH), this checkout's .venv for the rest.
            build_env = {**env, "PYTHONPATH": str(tree)}
            argv = [*web_argv(port), "--log-level=warning"]
            web = stack.enter_context(running(argv, port=port, env=build_env, cwd=tree, timeout=60))
            workers[build] = (web.pid, f"http://127.0.0.1:{port}")
        first = next(iter(workers.values()))[1]
        setup_registry(first, [sim_a.url, sim_b.url], {}, pd, 1)
        for _, url in workers.values():
            wait_ready(url, MODEL, headers=auth)
            if pd is not None:
                wait_ready(url, PD_MODEL, headers=auth)

        def measure(pid: int, url: str) -> dict[str, float]:
            figure = {
                "CPU per request, c=32": run_wrk(url + PATH, auth, small, 32, args.duration, pid).cpu_us or 0.0,
                "one client p50": pct(one_client_latency(url, PATH, auth, small, args.requests), 0.5) * 1e6,
                "stream chunks/s": streams(url + PATH, auth, stream_body, 8, 400, 2.0).chunks_per_s,
            }
            if pd is not None:
                figure["PD: CPU per request, c=32"] = measure_pd(url, auth, pid, pd[0], args.duration).wrk.cpu_us or 0.0
            return figure

        order = list(workers)
        print(f"this tree against {args.base} ({commit[:10]}), {args.rounds} rounds after a warm-up:", flush=True)
        for number in range(args.rounds + 1):
            direct = pct(one_client_latency(sim_a.url, PATH, {}, small, args.requests), 0.5) * 1e6
            measured = {build: measure(*workers[build]) for build in (order if number % 2 else order[::-1])}
            if number == 0:
                continue
            direct_p50.append(direct)
            for build, figure in measured.items():
                for name, value in figure.items():
                    results[build][name].append(value)
            line = "; ".join(
                f"{build} " + " / ".join(_fmt(name, figure[name]) for name in figures)
                for build, figure in measured.items()
            )
            print(f"round {number}: {line}; DIRECT one client p50 {direct:,.0f} us", flush=True)
    print(report(results, figures, direct_p50))
    return 0


def _fmt(name: str, value: float) -> str:
    unit, _ = FIGURES[name]
    return f"{value:,.1f} {unit}" if unit else f"{value:,.0f}"


def report(results: dict[str, dict[str, list[float]]], figures: list[str], direct_p50: list[float]) -> str:
    """Each figure's medians, and in how many rounds this tree did better than the base."""
    this, base = list(results)
    lines = [
        "",
        f"| figure | {this} | {base} | {this} better, rounds |",
        "|---|---|---|---|",
    ]
    for name in figures:
        ours, theirs = results[this][name], results[base][name]
        _, higher = FIGURES[name]
        wins = sum((a > b) if higher else (a < b) for a, b in zip(ours, theirs, strict=True))
        median_ours, median_theirs = statistics.median(ours), statistics.median(theirs)
        lines.append(f"| {name} | {_fmt(name, median_ours)} | {_fmt(name, median_theirs)} | {wins} of {len(ours)} |")
    lines.append(f"| DIRECT one client p50 | {statistics.median(direct_p50):,.0f} us | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
