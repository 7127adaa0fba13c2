"""Cache-aware routing on real engines (``make bench-cache``): which routing strategy makes vLLM's own
prefix cache hit, and how evenly it spreads the requests.

    .venv/bin/python bench/cache_routing.py --workload issue
    .venv/bin/python bench/cache_routing.py --workload large --strategies prefix_cache

Starts three real vLLM servers (the CPU build in .venv-vllm, the tiny chat model, prefix caching on;
tests/realengines/harness.py starts them as the real-engine tier does), a private Redis and
RouterPanel (one uvicorn worker, tests/support/stack.py), and registers the three servers under one
model. Then, for each strategy, it empties every server's prefix cache (vLLM's
``POST /reset_prefix_cache``, served with ``VLLM_SERVER_DEV_MODE=1``), sets the model's route policy
and plays a conversation workload through RouterPanel: N conversations of T turns, C at a time, each
with a long system prompt of its own (``--shared`` of them share one). Every turn appends the model's
answer and a new user message, so every prompt extends the conversation's previous one.

Printed per strategy, from the deltas of each server's own counters over the run: the fleet
prefix-cache hit rate (``vllm:prefix_cache_hits_total`` / ``vllm:prefix_cache_queries_total``, in
prompt tokens), the requests each server completed (``vllm:request_success_total``) and the busiest
server's share over an even share. ``--kv-blocks`` gives every server a KV cache of that many blocks
(``--num-gpu-blocks-override``; 128 tokens a block on CPU) for runs under cache pressure. Every run
salts its prompts, so no strategy finds another's prefixes in RouterPanel's memory.

docs/cache-routing.md holds the figures and what they showed.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.realengines.harness import (  # noqa: E402
    VLLM_PYTHON,
    ServerSpec,
    VllmFleet,
    VllmServer,
    build_models,
    long_prompt,
)
from tests.support.procs import RedisServer  # noqa: E402
from tests.support.stack import PROXY_KEY, StackPool, StackSpec  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402

HITS, QUERIES, DONE = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:request_success_total"
STRATEGIES = ("round_robin", "prefix_cache", "consistent_hash")
# conversations, turns, concurrency, conversations sharing one system prompt, KV blocks per server,
# words of a system prompt (about 3 tokens each), words of a user message, tokens of an answer
PRESET = ("conversations", "turns", "concurrency", "shared", "kv_blocks", "system_words", "user_words", "max_tokens")
WORKLOADS = {
    # the first measurement's shape: KV cache far larger than the work (about 7 blocks a conversation)
    "issue": (12, 5, 4, 0, None, 200, 12, 16),
    # four times the conversations, a third of them on one system prompt; shorter, to stay within minutes
    "large": (48, 6, 8, 16, None, 100, 8, 8),
    # "issue" against 24 blocks per server: about 84 blocks of conversations, 72 blocks of cache in all
    "pressure": (12, 5, 4, 0, 24, 200, 12, 16),
}


@dataclass
class Result:
    strategy: str
    hit_rate: float
    requests: list[int]
    max_over_even: float
    seconds: float
    errors: int


def play(
    base: str,
    model: str,
    *,
    salt: str,
    conversations: int,
    turns: int,
    concurrency: int,
    shared: int,
    system_words: int,
    user_words: int,
    max_tokens: int,
) -> int:
    """Play the workload through RouterPanel; return how many requests failed."""
    work: queue.Queue[int] = queue.Queue()
    for number in range(conversations):
        work.put(number)
    errors = [0]
    shared_system = long_prompt(f"{salt} shared system prompt", system_words)

    def conversation(client: httpx.Client, number: int) -> None:
        system = shared_system if number < shared else long_prompt(f"{salt} system prompt {number}", system_words)
        messages = [{"role": "system", "content": system}]
        for turn in range(turns):
            question = f"conversation {number} turn {turn}: " + " ".join(
                f"q{number}x{turn}w{i}" for i in range(user_words)
            )
            messages.append({"role": "user", "content": question})
            response = client.post(
                "/v1/chat/completions",
                json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0},
                headers={"x-session-id": f"{salt}-{number}"},
            )
            if response.status_code != 200:
                errors[0] += 1
                return
            messages.append({"role": "assistant", "content": response.json()["choices"][0]["message"]["content"]})

    def worker() -> None:
        headers = {"Authorization": f"Bearer {PROXY_KEY}"}
        with httpx.Client(base_url=base, headers=headers, timeout=600) as client:
            while True:
                try:
                    number = work.get_nowait()
                except queue.Empty:
                    return
                conversation(client, number)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # a join with a timeout lets Ctrl-C through to the clean-up
            thread.join(0.5)
    return errors[0]


def counters(servers: Sequence[VllmServer]) -> list[dict[str, float]]:
    return [server.metric_values(HITS, QUERIES, DONE) for server in servers]


def reset_prefix_caches(servers: Sequence[VllmServer]) -> None:
    """Empty every server's prefix cache (refused while requests hold blocks: retried)."""
    for server in servers:

        def reset(url: str = server.url) -> bool:
            return bool(httpx.post(f"{url}/reset_prefix_cache", timeout=30).json().get("success"))

        wait_until(reset, 60, f"{server.url} never reset its prefix cache", interval=0.5)


def measure(
    stack_base: str,
    set_policy: Callable[..., None],
    servers: Sequence[VllmServer],
    strategy: str,
    run: int,
    args: argparse.Namespace,
) -> Result:
    reset_prefix_caches(servers)
    set_policy(servers[0].model, strategy=strategy)
    before = counters(servers)
    started = time.monotonic()
    errors = play(
        stack_base,
        servers[0].model,
        salt=f"run{run}-{strategy}",
        conversations=args.conversations,
        turns=args.turns,
        concurrency=args.concurrency,
        shared=args.shared,
        system_words=args.system_words,
        user_words=args.user_words,
        max_tokens=args.max_tokens,
    )
    seconds = time.monotonic() - started
    after = counters(servers)
    hits = sum(a[HITS] - b[HITS] for a, b in zip(after, before, strict=True))
    queries = sum(a[QUERIES] - b[QUERIES] for a, b in zip(after, before, strict=True))
    requests = [round(a[DONE] - b[DONE]) for a, b in zip(after, before, strict=True)]
    even = sum(requests) / len(requests) if requests else 0
    return Result(
        strategy=strategy,
        hit_rate=hits / queries if queries else 0.0,
        requests=requests,
        max_over_even=max(requests) / even if even else 0.0,
        seconds=seconds,
        errors=errors,
    )


def workload_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """``args`` with the preset ``name`` filling whatever the command line left out."""
    preset = dict(zip(PRESET, WORKLOADS[name], strict=True))
    chosen = argparse.Namespace(**vars(args))
    for field, value in preset.items():
        if getattr(chosen, field) is None:
            setattr(chosen, field, value)
    chosen.workload = name
    return chosen


def table(results: Sequence[Result]) -> str:
    lines = ["| strategy | fleet prefix-cache hit rate | requests per server | max / even share |", "|---|---|---|---|"]
    for r in results:
        requests = " / ".join(map(str, r.requests))
        lines.append(f"| {r.strategy} | {r.hit_rate:.1%} | {requests} | {r.max_over_even:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=["issue"], help="presets, in turn")
    parser.add_argument("--conversations", type=int)
    parser.add_argument("--turns", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--shared", type=int, help="conversations that share one system prompt")
    parser.add_argument("--kv-blocks", type=int, help="KV cache blocks per server (cache pressure)")
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--system-words", type=int, help="about 3 tokens a word")
    parser.add_argument("--user-words", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--skip", nargs="+", default=[], metavar="WORKLOAD:STRATEGY", help="runs to leave out")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not VLLM_PYTHON.exists():
        print(f"no vLLM virtualenv at {VLLM_PYTHON}: run `make vllm-env`", file=sys.stderr)
        return 2
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # serves POST /reset_prefix_cache (the servers inherit it)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on a kill too
    report: dict[str, list[Result]] = {}
    run = 0
    with tempfile.TemporaryDirectory(prefix="rp-bench-cache-") as tmp:
        fleet = VllmFleet(python=VLLM_PYTHON, models=build_models(), log_dir=Path(tmp), max_servers=args.servers)
        redis_server = RedisServer(Path(tmp), databases=32).start()
        pool = StackPool(Path(tmp), redis_server)
        try:
            stack = pool.get(StackSpec())
            for name in args.workload:
                w = workload_args(args, name)
                print(
                    f"\n{name}: {w.conversations} conversations x {w.turns} turns, concurrency {w.concurrency}, "
                    f"{w.shared} sharing one system prompt, KV blocks per server: {w.kv_blocks or 'default'}",
                    flush=True,
                )
                extra = ("--num-gpu-blocks-override", str(w.kv_blocks)) if w.kv_blocks else ()
                started = time.monotonic()
                servers = fleet.get(*(ServerSpec(instance=i, extra_args=extra) for i in range(w.servers)))
                print(f"{len(servers)} vLLM servers ready in {time.monotonic() - started:.0f} s", flush=True)
                stack.reset()
                for server in servers:
                    stack.add_node(server.url, [server.model], role="hybrid", engine_type="vllm", settle=False)
                stack.settle()
                results = report[name] = []
                for strategy in w.strategies:
                    if f"{name}:{strategy}" in args.skip:
                        continue
                    run += 1
                    result = measure(stack.base, stack.set_policy, servers, strategy, run, w)
                    results.append(result)
                    print(
                        f"{strategy:16} hit rate {result.hit_rate:6.1%}  requests "
                        f"{' / '.join(map(str, result.requests)):14} max/even {result.max_over_even:.2f}  "
                        f"{result.seconds:5.0f} s  errors {result.errors}",
                        flush=True,
                    )
        finally:
            pool.close()
            fleet.close()
            redis_server.stop()
    for name, results in report.items():
        print(f"\n{name}\n{table(results)}")
    if args.json:
        payload = {name: [asdict(r) for r in results] for name, results in report.items()}
        args.json.write_text(json.dumps(payload, indent=1))
    return 1 if any(r.errors for results in report.values() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
