"""The PD chaos soak (docs/pd.md): 1,000 NanoDeploy PD requests at concurrency 32 through RouterPanel
(uvicorn) and real simulated engines, mixed chat/completions and streaming/non-streaming, while the
client leaves at random moments and a chaos task injects prefill and decode errors, hangs, slow
first tokens and dropped answers. At the end every KV block a prefill allocated was freed exactly
once, RouterPanel holds no counter and no pending clean-up, and no engine has a request open.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time

import aiohttp
import pytest

from enginesim.testing import run_simulator
from tests.e2e.pd_support import (
    chat,
    completion,
    expected_text,
    metric_values,
    path_of,
    wait_kv_settled,
    wait_router_idle,
)
from tests.support.stack import StackSpec

# RouterPanel under uvicorn (the soak need not run twice). The chaos injects failures on purpose:
# circuit breakers that took nodes out of rotation would turn the soak into a 503 test.
STACK = StackSpec(settings={"ROUTERPANEL_BREAKER_FAILURES": "1000000"})
pytestmark = [pytest.mark.e2e, pytest.mark.stack(STACK)]

MODEL = "chaos-model"
REQUESTS = 1000
CONCURRENCY = 32
SEED = 6


class Tally:
    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self.wrong: list[str] = []


def make_request(rng: random.Random, i: int) -> dict:
    make = chat if rng.random() < 0.5 else completion
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "kv", "cache"]) for _ in range(rng.randint(3, 12)))
    prompt = f"request {i}: {words}" + (" [[eos]]" if rng.random() < 0.05 else "")
    body = make(MODEL, prompt, max_tokens=rng.randint(2, 24))
    if rng.random() < 0.5:
        body["stream"] = True
        if rng.random() < 0.3:
            body["stream_options"] = {"include_usage": True}
    return body


def sse_text(raw: bytes) -> tuple[str, bool]:
    """The text of an SSE answer and whether it ended with an error event."""
    pieces, failed = [], False
    for block in raw.decode().split("\n\n"):
        if not block.startswith("data: ") or block == "data: [DONE]":
            continue
        event = json.loads(block[6:])
        if "error" in event:
            failed = True
            continue
        for choice in event.get("choices") or []:
            delta = choice.get("delta")
            pieces.append((delta.get("content") or "") if delta is not None else choice.get("text", ""))
    return "".join(pieces), failed


async def one_request(client: aiohttp.ClientSession, url: str, body: dict, rng: random.Random, tally: Tally) -> None:
    leave = rng.random()
    stream = body.get("stream") is True

    async def run() -> None:
        async with client.post(url + path_of(body), json=body) as response:
            if stream and response.status == 200 and leave < 0.2:
                # Leave mid-stream after a few chunks.
                for _ in range(rng.randint(1, 3)):
                    if not await response.content.readany():
                        break
                tally.outcomes["left mid-stream"] += 1
                response.close()
                return
            raw = await response.read()
            if response.status != 200:
                tally.outcomes[f"status {response.status}"] += 1
                return
            if stream and response.content_type == "text/event-stream":
                text, failed = sse_text(raw)
                if failed:
                    tally.outcomes["stream ended with error event"] += 1
                    return
            else:
                data = json.loads(raw)
                choice = data["choices"][0]
                text = choice["message"]["content"] if "message" in choice else choice["text"]
            tally.outcomes["ok"] += 1
            if text != expected_text(body):
                tally.wrong.append(f"{body}: {text!r}")

    if leave < 0.1:
        # Leave at a random moment: before the prefill answered, during the decode, or never.
        try:
            # Half of them aim at the prefill (60 ms; RouterPanel notices a disconnect 20-40 ms into a
            # request): the moment that tempts a router to leak the KV the prefill has allocated.
            moment = rng.uniform(0.005, 0.05) if rng.random() < 0.5 else rng.uniform(0.0, 0.15)
            async with asyncio.timeout(moment):
                await run()
        except TimeoutError:
            tally.outcomes["left at a random moment"] += 1
        return
    await run()


async def chaos(sims: list, stop: asyncio.Event, rng: random.Random, tally: Tally) -> None:
    """Every few dozen milliseconds, arm a fault on a random engine for its next request(s)."""
    async with aiohttp.ClientSession() as admin:
        while not stop.is_set():
            sim = rng.choice(sims)
            role = sim.role
            kind = rng.choice(["error", "error", "hang", "drop", "drop", "slow"])
            faults = {
                "error": {"error_rate": 1.0, "error_status": rng.choice([500, 503]), "count": rng.randint(1, 3)},
                "hang": {"hang": True, "count": 1},
                "drop": {"close_after_chunks": rng.randint(0, 4), "count": 1},
                "slow": {"slow_first_token_ms": rng.uniform(20, 300), "count": rng.randint(1, 4)},
            }[kind]
            async with admin.post(sim.url + "/sim/faults", json=faults) as response:
                assert response.status == 200, await response.text()
            tally.faults[f"{role} {kind}"] += 1
            await asyncio.sleep(rng.uniform(0.01, 0.04))


async def soak(base: str, key: str, sims: list, tally: Tally) -> float:
    rng = random.Random(SEED)
    bodies = [make_request(rng, i) for i in range(REQUESTS)]
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    stop = asyncio.Event()
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2)
    started = time.monotonic()
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=60)
    ) as client:

        async def worker(n: int) -> None:
            worker_rng = random.Random(SEED * 1000 + n)
            while not queue.empty():
                body = queue.get_nowait()
                await one_request(client, base + "/v1", body, worker_rng, tally)

        chaos_task = asyncio.create_task(chaos(sims, stop, random.Random(SEED + 1), tally))
        try:
            async with asyncio.timeout(170):
                await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
        finally:
            stop.set()
            await chaos_task
    return time.monotonic() - started


@pytest.fixture(scope="module")
def fleet():
    common = {"engine": "nanodeploy", "served_model_name": MODEL, "model_path": "/models/chaos-model"}
    with (
        run_simulator(role="prefill", ttft_ms=60, **common) as p1,
        run_simulator(role="prefill", ttft_ms=60, **common) as p2,
        run_simulator(role="decode", ttft_ms=2, itl_ms=2, **common) as d1,
        run_simulator(role="decode", ttft_ms=2, itl_ms=2, **common) as d2,
    ):
        for sim, role in ((p1, "prefill"), (p2, "prefill"), (d1, "decode"), (d2, "decode")):
            sim.role = role
        yield [p1, p2], [d1, d2]


def test_a_thousand_pd_requests_under_chaos_leak_nothing(stack, fleet, capsys):
    prefills, decodes = fleet
    sims = [*prefills, *decodes]
    for sim in sims:
        sim.reset()
    for sim in prefills:
        stack.add_node(sim.url, [MODEL], role="prefill", engine_type="nanodeploy", settle=False)
    for sim in decodes:
        stack.add_node(sim.url, [MODEL], role="decode", engine_type="nanodeploy", settle=False)
    stack.set_policy(MODEL, serving_mode="pd", retry_budget=1, first_token_timeout=1.0, total_timeout=3.0, settle=False)
    stack.settle()

    tally = Tally()
    duration = asyncio.run(soak(stack.base, stack.key, sims, tally))
    for sim in sims:
        sim.set_faults()

    ledgers = wait_kv_settled(prefills, timeout=30)
    router = wait_router_idle(stack, timeout=30)
    open_requests = [sim.wait_for(lambda s: s["requests"]["in_flight"] == 0, timeout=30) for sim in sims]
    engine_stats = [sim.stats() for sim in sims]
    kv = {k: sum(ledger[k] for ledger in ledgers) for k in ("allocated", "freed", "double_free", "unknown_free")}
    kv["outstanding"] = sum(ledger["outstanding_count"] for ledger in ledgers)
    figures = {
        "requests": sum(tally.outcomes.values()),
        "duration_s": round(duration, 1),
        "outcomes": dict(sorted(tally.outcomes.items())),
        "faults_armed": dict(sorted(tally.faults.items())),
        "faults_hit": {s["role"] + f":{s['port']}": s["requests"]["faults_injected"] for s in engine_stats},
        "engine_cancelled": sum(s["requests"]["cancelled"] for s in engine_stats),
        "kv": kv,
        "routerpanel_frees": metric_values(stack, "routerpanel_proxy_pd_frees_total"),
        "routerpanel_shielded_prefills": sum(
            metric_values(stack, "routerpanel_proxy_pd_shielded_prefills_total").values()
        ),
        "routerpanel": router,
        "engine_requests_open": sum(s["requests"]["in_flight"] for s in open_requests),
    }
    with capsys.disabled():
        print("\nPD chaos soak:", json.dumps(figures, indent=2))

    assert figures["requests"] == REQUESTS
    assert not tally.wrong, tally.wrong[:5]
    assert tally.outcomes["ok"] > REQUESTS // 2
    assert sum(n for k, n in tally.outcomes.items() if k.startswith("left")) > 50
    assert sum(figures["faults_hit"].values()) > 50
    assert kv["allocated"] > 500
    assert figures["routerpanel_shielded_prefills"] > 0  # clients did leave while a prefill held KV
    assert kv["outstanding"] == 0 and kv["double_free"] == 0 and kv["unknown_free"] == 0
    assert kv["freed"] == kv["allocated"]
    assert router == {"node_inflight": 0, "pd_inflight": 0, "pd_cleanups_pending": 0}
    assert figures["engine_requests_open"] == 0
