"""``make bench-ab BASE=<rev>``: this tree against another revision, both up at once, round by round.

``make bench`` measures one build, and on a small shared machine the same build's figures move by
a third from one run to the next: a change of a few percent shows only when the two builds run side
by side, in front of the same engines, in alternating rounds. This starts one web worker from this
tree (uncommitted changes included) and one from ``BASE`` (exported with ``git archive`` under
``var/bench-ab/``), both with this checkout's virtualenv, one Redis and one database (so ``BASE``
must have the same migrations), in front of two fast simulated engines, and measures them as
``make bench PEERS=1`` measures the peers (``bench.peers.head_to_head``: an uncounted pass, then
rounds that each start with the next worker):

- CPU per request of the web worker under wrk at c=32 (non-streaming);
- the p50 one client adds to DIRECT's, measured at the start of the same round;
- stream chunks/s, 8 unpaced 64-chunk streams at a time;
- with ``--pd``, CPU per prefill/decode request at c=32 (bench/pd.py's pair).

It prints the rounds, then each figure's medians and in how many rounds this tree did better: a
difference that is not better in most rounds is not one this machine can show.

With ``--base-venv`` (``make bench-ab BASE_VENV=<dir>``) BASE's worker runs from that virtualenv's
``uvicorn`` instead: another interpreter, or other package versions, against this checkout's
(``BASE=HEAD`` compares them alone; docs/architecture.md, "The interpreter's own build").
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
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import chat_body, streams
from bench.pd import PD_MODEL, measure_pd, pd_engines
from bench.peers import PATH, Contender, head_to_head, head_to_head_table, wait_ready
from bench.run import setup_registry
from bench.webenv import MODEL, PROXY_KEY, prepare_database, production_env
from enginesim.testing import run_simulator
from nodes.localredis import redis_server_argv
from tests.support.ports import free_port
from tests.support.procs import REPO_ROOT, running, web_argv

EXPORTS = REPO_ROOT / "var" / "bench-ab"

# head_to_head's figures: (name, scale, unit, True when higher is better)
FIGURES: dict[str, tuple[str, float, str, bool]] = {
    "cpu_us_c32": ("CPU per request, c=32", 1.0, " us", False),
    "added_p50": ("added p50, one client", 1e6, " us", False),
    "chunks_per_s": ("stream chunks/s", 1.0, "", True),
    "pd_cpu_us_c32": ("PD: CPU per request, c=32", 1.0, " us", False),
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
    parser.add_argument("--base-venv", type=Path, help="run BASE's worker from this virtualenv (its bin/uvicorn)")
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
    base_uvicorn = None
    if args.base_venv is not None:
        base_uvicorn = args.base_venv.resolve() / "bin" / "uvicorn"
        if not base_uvicorn.is_file():
            print(f"no {base_uvicorn}: --base-venv takes a virtualenv with RouterPanel's packages", file=sys.stderr)
            return 2
    base_tree = export(commit)
    base = f"base {commit[:10]}" + ("" if base_uvicorn is None else f" on {args.base_venv}")
    builds = {"this tree": REPO_ROOT, base: base_tree}

    tmp = Path(tempfile.mkdtemp(prefix="routerpanel-bench-ab-"))
    redis_port = free_port()
    env = production_env(tmp, redis_port, MALLOC_ARENA_MAX=os.environ.get("MALLOC_ARENA_MAX", "2"))
    prepare_database(env)
    auth = {"Authorization": f"Bearer {PROXY_KEY}"}
    fast = ["--fast", "--record-requests=0"]
    stream_body = chat_body(MODEL, 64, stream=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(redis_server_argv(port=redis_port, data_dir=tmp), port=redis_port))
        sim_a = stack.enter_context(run_simulator(served_model_name=MODEL, extra_args=fast))
        sim_b = stack.enter_context(run_simulator(served_model_name=MODEL, extra_args=fast))
        pd = stack.enter_context(pd_engines()) if args.pd else None
        contenders = []
        for build, tree in builds.items():
            port = free_port()
            # Each worker imports its own tree's packages first (PYTHONPATH), this checkout's .venv for the rest.
            build_env = {**env, "PYTHONPATH": str(tree)}
            argv = [*web_argv(port), "--log-level=warning"]
            if base_uvicorn is not None and build == base:
                argv[0] = str(base_uvicorn)
            web = stack.enter_context(running(argv, port=port, env=build_env, cwd=tree, timeout=60))
            contenders.append(Contender(build, f"http://127.0.0.1:{port}", web.pid, auth))
        setup_registry(contenders[0].base, [sim_a.url, sim_b.url], {}, pd, 1)
        for contender in contenders:
            wait_ready(contender.base, MODEL, headers=auth)
            if pd is not None:
                wait_ready(contender.base, PD_MODEL, headers=auth)
        extra: dict[str, Callable[[Contender], float]] = {
            "chunks_per_s": lambda c: streams(c.base + PATH, auth, stream_body, 8, 400, 2.0).chunks_per_s,
        }
        if pd is not None:
            prefill = pd[0]
            extra["pd_cpu_us_c32"] = lambda c: measure_pd(c.base, auth, c.pid, prefill, args.duration).wrk.cpu_us or 0.0
        print(f"this tree against {args.base} ({commit[:10]}), {args.rounds} rounds after a warm-up...", flush=True)
        results = head_to_head(
            contenders,
            sim_a.url,
            MODEL,
            rounds=args.rounds,
            duration=args.duration,
            latency_requests=args.requests,
            extra=extra,
        )
    print(head_to_head_table(results))
    print(report(results))
    return 0


def report(results: dict[str, dict[str, list[float]]]) -> str:
    """Each figure's medians beside the base's, and in how many rounds this tree did better."""
    this, base = list(results)
    lines = ["", f"| figure | {this} | {base} | {this} better, rounds |", "|---|---|---|---|"]
    for key, (name, scale, unit, higher) in FIGURES.items():
        if key not in results[this]:
            continue
        ours, theirs = results[this][key], results[base][key]
        wins = sum((a > b) if higher else (a < b) for a, b in zip(ours, theirs, strict=True))
        digits = 1 if unit else 0
        medians = [f"{statistics.median(values) * scale:,.{digits}f}{unit}" for values in (ours, theirs)]
        lines.append(f"| {name} | {medians[0]} | {medians[1]} | {wins} of {len(ours)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
