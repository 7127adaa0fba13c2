"""What usage accounting and token budgets cost a web worker per request, measured in process
(``python bench/usage_micro.py``): CPU time per call, medians of ``--repeat`` runs, as
``bench/explain_micro.py`` measures explanations.

- ``check``: a budgeted key's request is admitted (``TokenBudgets.exceeded``);
- ``record``: a request that ended counts its tokens from the answer's usage (``TokenBudgets.record``);
- ``ask``: a stream's body asks the engine for usage (``proxy.usage.with_usage``);
- ``relay``: the relay's hook over a vLLM stream of ``--chunks`` reads, its usage chunk taken out
  (``TakenUsage.feed`` on each read, ``finish`` once), against passing the reads through;
- ``flush``: the loop's share per request: queueing one worker's counts of ``--keys`` keys for
  Redis (``queue_flush`` into a pipeline that only records the commands), per request at 1,000
  requests per flush.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "routerpanel.settings")

import django  # noqa: E402

django.setup()

from proxy.budgets import TokenBudgets  # noqa: E402
from proxy.snapshot import KeyView  # noqa: E402
from proxy.usage import TakenUsage, with_usage  # noqa: E402

ANSWER = (
    b'{"id":"cmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":'
    b'{"role":"assistant","content":"' + b"x" * 200 + b'"},"finish_reason":"length"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":16,"total_tokens":28}}'
)
BODY = b'{"model":"m","messages":[{"role":"user","content":"' + b"y" * 400 + b'"}],"stream":true,"max_tokens":64}'


def stream(chunks: int) -> list[bytes]:
    head = {"id": "chatcmpl-r1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
    reads = []
    for i in range(chunks):
        finish = "length" if i == chunks - 1 else None
        choice = {"index": 0, "delta": {"content": " word"}, "logprobs": None, "finish_reason": finish}
        reads.append(b"data: " + json.dumps({**head, "choices": [choice]}, separators=(",", ":")).encode() + b"\n\n")
    usage = {"prompt_tokens": 9, "total_tokens": 9 + chunks, "completion_tokens": chunks}
    tail = {**head, "choices": [], "usage": usage, "system_fingerprint": "vllm-0.32.0-abc"}
    reads.append(b"data: " + json.dumps(tail, separators=(",", ":")).encode() + b"\n\ndata: [DONE]\n\n")
    return reads


class RecordingPipe:
    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[object, ...]]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args: self.commands.append((name, args))


def per_call(fn: Callable[[], object], number: int, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(number):
            fn()
        runs.append((time.process_time() - started) / number)
    return statistics.median(runs)


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

    def taken() -> None:
        hook = TakenUsage()
        for read in reads:
            if hook.feed(read):
                pass
        hook.finish()

    def flush() -> None:
        for i in range(1000):
            budgets.minute[(i % args.keys, 1)] = budgets.minute.get((i % args.keys, 1), 0) + 1
            budgets.day[(i % args.keys, 1)] = budgets.day.get((i % args.keys, 1), 0) + 1
        budgets.queue_flush(RecordingPipe(), [key.id], time.time())
        budgets.flushed((0, 0), [key.id], [[b"1"], [b"1"]])

    relay = per_call(taken, number // 10, repeat) - per_call(passthrough, number // 10, repeat)
    figures = {
        "check": per_call(lambda: budgets.exceeded(key), number, repeat),
        "record": per_call(lambda: budgets.record(key.id, ANSWER), number, repeat),
        "ask": per_call(lambda: with_usage(BODY), number, repeat),
        f"relay ({args.chunks} reads)": relay,
        "flush": (per_call(flush, max(1, number // 1000), repeat) - per_call(lambda: None, 1, 1)) / 1000,
    }
    print(f"load average {os.getloadavg()[0]:.1f}; CPU time per request, medians of {repeat} runs")
    for name, seconds in figures.items():
        print(f"  {name:<20} {seconds * 1e6:7.2f} µs")


if __name__ == "__main__":
    main()
