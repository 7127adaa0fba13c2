"""What usage accounting and token budgets cost a web worker per request, measured in process
(``python bench/usage_micro.py``): CPU time per call, medians of ``--repeat`` runs, as
``bench/explain_micro.py`` measures explanations.

- ``check``: a budgeted key's request is admitted (``TokenBudgets.exceeded``);
- ``record``: a request that ended is counted: its tokens from the answer's usage, for the key's
  budgets and in its (key, model, node) minute bucket with its request, error and time to first
  token (``Accounting.record``);
- ``ask``: a stream's body asks the engine for usage (``proxy.usage.with_usage``);
- ``relay``: the relay's hook over a vLLM stream of ``--chunks`` reads, its usage chunk taken out
  (``TakenUsage.feed`` on each read, ``finish`` once), against passing the reads through; and over
  an LMDeploy stream, whose every chunk also loses the ``"usage": null`` it gained;
- ``flush``: the loop's share per request: queueing one worker's budget counts and minute buckets
  of ``--keys`` keys for Redis (into a pipeline that only records the commands), per request at
  1,000 requests per flush.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The answer and the timing explanations are measured with (importing it sets Django up).
from bench.explain_micro import ANSWER, per_call, private_redis  # noqa: E402
from nodes.live import usage as live_usage  # noqa: E402
from proxy.accounting import Accounting  # noqa: E402
from proxy.budgets import TokenBudgets  # noqa: E402
from proxy.request import Outcome  # noqa: E402
from proxy.snapshot import KeyView  # noqa: E402
from proxy.usage import SHAPES, taken_usage, with_usage  # noqa: E402

BODY = b'{"model":"m","messages":[{"role":"user","content":"' + b"y" * 400 + b'"}],"stream":true,"max_tokens":64}'


def stream(chunks: int, engine: str = "vllm") -> list[bytes]:
    """vLLM's stream asked for usage (compact JSON), or LMDeploy's (``json.dumps``, each chunk with
    ``"usage": null`` last, no ``finish_reason`` until the end)."""
    lmdeploy = engine == "lmdeploy"
    separators = (", ", ": ") if lmdeploy else (",", ":")
    head = {"id": "chatcmpl-r1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
    reads = []
    for i in range(chunks):
        finish = "length" if i == chunks - 1 else None
        choice: dict[str, object] = {"index": 0, "delta": {"content": " word"}}
        if lmdeploy:
            choice |= {"finish_reason": finish} if finish else {}
            chunk = {**head, "choices": [choice], "usage": None}
        else:
            chunk = {**head, "choices": [{**choice, "logprobs": None, "finish_reason": finish}]}
        reads.append(b"data: " + json.dumps(chunk, separators=separators).encode() + b"\n\n")
    usage = {"prompt_tokens": 9, "total_tokens": 9 + chunks, "completion_tokens": chunks}
    tail: dict[str, object] = {**head, "choices": [], "usage": usage}
    if not lmdeploy:
        tail["system_fingerprint"] = "vllm-0.32.0-abc"
    reads.append(b"data: " + json.dumps(tail, separators=separators).encode() + b"\n\ndata: [DONE]\n\n")
    return reads


class RecordingPipe:
    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[object, ...]]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args: self.commands.append((name, args))


def measure_redis(filled: Accounting, budgeted: list[int], flushes: int) -> float | None:
    """CPU seconds of this process per flush of ``filled``'s buckets and budget counts to a private
    redis-server (the pipelines the worker's loop sends), or None without redis-server."""
    import redis.asyncio as aioredis

    buckets = dict(filled.buckets)
    minute, day = dict(filled.budgets.minute), dict(filled.budgets.day)
    with private_redis() as port:
        if port is None:
            return None

        async def run() -> float:
            client = aioredis.Redis(port=port)
            spent = 0.0
            for _ in range(flushes + 1):
                filled.buckets = dict(buckets)
                filled.budgets.minute, filled.budgets.day = dict(minute), dict(day)
                started = time.process_time()
                await filled.flush(client)
                async with client.pipeline(transaction=False) as pipe:
                    windows = filled.budgets.queue_flush(pipe, budgeted, time.time())
                    filled.budgets.flushed(windows, budgeted, await pipe.execute())
                spent = 0.0 if spent == 0.0 and _ == 0 else spent + time.process_time() - started
            await client.aclose()
            return spent / flushes

        return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--chunks", type=int, default=64, help="reads in the stream the relay hook sees")
    parser.add_argument("--keys", type=int, default=100, help="keys with tokens in one flush")
    args = parser.parse_args()
    number, repeat = args.number, args.repeat
    budgets = TokenBudgets()
    key = KeyView(id=1, name="bench", allowed_models=frozenset(), tokens_per_minute=10**12, tokens_per_day=10**12)
    reads = stream(args.chunks)

    def passthrough() -> None:
        for read in reads:
            if read:
                pass

    def relaying(engine: str) -> Callable[[], None]:
        shape, engine_reads = SHAPES[engine], stream(args.chunks, engine)

        def taken() -> None:
            hook = taken_usage(shape)
            for read in engine_reads:
                if hook.feed(read):
                    pass
            hook.finish()

        return taken

    accounting = Accounting(budgets)
    outcome = Outcome(status=200, node="http://10.0.0.1:8000", usage=ANSWER, ttft=0.05)
    filled = Accounting(TokenBudgets())
    for i in range(args.keys):
        filled.record(KeyView(id=i + 1, name="k", allowed_models=frozenset()), "m", outcome)
    buckets = dict(filled.buckets)
    minute, day = dict(filled.budgets.minute), dict(filled.budgets.day)

    def flush() -> None:
        pipe = RecordingPipe()
        filled.budgets.minute, filled.budgets.day = dict(minute), dict(day)
        filled.budgets.queue_flush(pipe, [key.id], time.time())
        filled.budgets.flushed((0, 0), [key.id], [[b"1"], [b"1"]])
        live_usage.queue_add(pipe, buckets)

    relay, relay_lmdeploy = (
        per_call(relaying(engine), number // 10, repeat) - per_call(passthrough, number // 10, repeat)
        for engine in ("vllm", "lmdeploy")
    )
    figures = {
        "check": per_call(lambda: budgets.exceeded(key), number, repeat),
        "record": per_call(lambda: accounting.record(key, "m", outcome), number, repeat),
        "ask": per_call(lambda: with_usage(BODY), number, repeat),
        f"relay ({args.chunks} reads)": relay,
        "relay, LMDeploy": relay_lmdeploy,
        "flush": per_call(flush, max(1, number // 1000), repeat) / 1000,
    }
    print(f"load average {os.getloadavg()[0]:.1f}; CPU time per request, medians of {repeat} runs")
    for name, seconds in figures.items():
        print(f"  {name:<20} {seconds * 1e6:7.2f} µs")
    per_flush = measure_redis(filled, [key.id], flushes=20)
    if per_flush is not None:
        print(
            f"  flush to Redis       {per_flush * 1e6 / 1000:7.2f} µs  ({per_flush * 1e3:.1f} ms of CPU per flush of "
            f"{args.keys} keys' buckets, at 1,000 requests a flush)"
        )


if __name__ == "__main__":
    main()
