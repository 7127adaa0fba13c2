"""Two web worker processes on one database and one Redis agree: on the node table (within 1 s) and
on the load (least_requests on B sees A's streams). Then Redis goes away for 30 s under load: both
keep answering from their snapshots, and sharing resumes by itself when Redis returns."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from enginesim.testing import run_simulator
from nodes.localredis import redis_server_argv
from tests.procs import free_port, routerpanel_env, running, stop_process, uvicorn_argv, wait_for_port

pytestmark = pytest.mark.e2e

TOKEN = "e2e4444444444444444444444444444444444444"
PROXY_KEY = "rp-e2e-scale-key"


class PrivateRedis:
    """A redis-server of this module's own, which a test may stop and start on the same port."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            redis_server_argv(port=self.port, data_dir=self.data_dir), stdout=subprocess.DEVNULL
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("scale-out")
    private_redis = PrivateRedis(tmp)
    private_redis.start()
    env = routerpanel_env(tmp, private_redis.url, token=TOKEN, proxy_key=PROXY_KEY)
    ports = [free_port(), free_port()]
    with contextlib.ExitStack() as stack:
        stack.callback(private_redis.stop)
        for port in ports:
            stack.enter_context(running(uvicorn_argv(port), port=port, env=env, timeout=60))
        a, b = (f"http://127.0.0.1:{port}" for port in ports)
        api = stack.enter_context(httpx.Client(base_url=a, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10))
        yield {"a": a, "b": b, "api": api, "redis": private_redis}


@pytest.fixture
def clean(cluster: dict) -> dict:
    api: httpx.Client = cluster["api"]
    for node in api.get("/api/nodes/", params={"limit": 1000}).json()["results"]:
        api.delete(f"/api/nodes/{node['id']}/")
    return cluster


def add_node(api: httpx.Client, url: str, model: str) -> None:
    response = api.post("/api/nodes/", json={"url": url, "models": [model], "engine_type": "openai"})
    assert response.status_code == 201, response.text


def completion(base: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": "hello", "max_tokens": 4, **extra}
    return httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {PROXY_KEY}"}, timeout=30)


def served(sim) -> int:
    return sim.stats()["requests"]["by_endpoint"].get("/v1/completions", 0)


def test_a_node_added_through_worker_a_gets_traffic_from_worker_b_within_a_second(clean) -> None:
    with run_simulator(served_model_name="scale-a") as sim:
        add_node(clean["api"], sim.url, "scale-a")
        added = time.monotonic()
        while completion(clean["b"], "scale-a").status_code != 200:
            assert time.monotonic() - added < 5, "worker B never routed to the new node"
            time.sleep(0.02)
        took = time.monotonic() - added
        assert served(sim) >= 1
    print(f"\nnode added on worker A served by worker B after {took * 1000:.0f} ms")
    assert took < 1.0


def test_a_keys_rate_limit_counts_requests_through_every_worker(clean) -> None:
    api: httpx.Client = clean["api"]
    with run_simulator(served_model_name="scale-d") as sim:
        add_node(api, sim.url, "scale-d")
        created = api.post("/api/api-keys/", json={"name": "limited", "rate_limit_rpm": 4})
        assert created.status_code == 201, created.text
        key = created.json()["key"]
        if 60 - time.time() % 60 < 15:  # the one-minute window must not roll over mid-test
            time.sleep(60 - time.time() % 60 + 0.5)
        time.sleep(1.0)  # both workers' snapshots know the key and the node

        def send(base: str) -> httpx.Response:
            body = {"model": "scale-d", "prompt": "hi", "max_tokens": 2}
            return httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})

        assert [send(clean["a"]).status_code for _ in range(2)] == [200, 200]
        time.sleep(0.5)  # B learns A's count at the next shared-counter sync (every 0.1 s)
        answers = [send(clean["b"]) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(answers[2].headers["retry-after"]) <= 60


async def _streams(base: str, model: str, count: int, opened: asyncio.Event) -> None:
    """Run ``count`` slow streams (about 8 s each) through ``base``; ``opened`` is set once all started.
    Each is read to its end: a client that stopped reading would count as gone and be cancelled."""
    headers = {"Authorization": f"Bearer {PROXY_KEY}"}
    body = {"model": model, "prompt": "[[len=400]] a long story", "stream": True}

    async def one(client: httpx.AsyncClient, started: list[int]) -> None:
        async with client.stream("POST", f"{base}/v1/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            async for _ in response.aiter_raw():
                if len(started) < count and not started.count(id(response)):
                    started.append(id(response))

    started: list[int] = []
    async with httpx.AsyncClient(timeout=60) as client:
        tasks = [asyncio.create_task(one(client, started)) for _ in range(count)]
        while len(started) < count:
            await asyncio.sleep(0.02)
        opened.set()
        await asyncio.gather(*tasks)


def test_worker_b_balances_around_the_streams_worker_a_holds(clean) -> None:
    api: httpx.Client = clean["api"]
    model = "scale-b"
    engine = {"served_model_name": model, "itl_ms": 20.0}
    with run_simulator(**engine) as busy, run_simulator(**engine) as idle:
        add_node(api, busy.url, model)
        policy = api.post("/api/route-policies/", json={"model": model, "strategy": "least_requests"})
        assert policy.status_code == 201, policy.text
        time.sleep(1.0)

        async def scenario() -> None:
            opened = asyncio.Event()
            holder = asyncio.create_task(_streams(clean["a"], model, 4, opened))
            await opened.wait()  # four streams on the busy node, all through worker A
            await asyncio.to_thread(add_node, api, idle.url, model)
            await asyncio.sleep(1.0)  # B's snapshot and shared view catch up
            answers = await asyncio.gather(*(asyncio.to_thread(completion, clean["b"], model) for _ in range(4)))
            assert [a.status_code for a in answers] == [200] * 4
            assert busy.stats()["requests"]["in_flight"] == 4  # A's streams were running all along
            await holder

        busy_before = served(busy)
        asyncio.run(scenario())
        # B knew A's four streams were on the busy node: all four of its requests went to the idle one
        # (with only its own counts it would have split them two and two).
        assert served(idle) == 4
        assert served(busy) == busy_before + 4  # only A's four streams


def test_redis_down_for_30_s_under_load_then_sharing_resumes(clean) -> None:
    api: httpx.Client = clean["api"]
    private_redis: PrivateRedis = clean["redis"]
    model = "scale-c"
    with run_simulator(served_model_name=model) as first, run_simulator(served_model_name=model) as second:
        add_node(api, first.url, model)
        time.sleep(1.0)

        async def load(stop: asyncio.Event, errors: list[str], ok: list[int]) -> None:
            async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {PROXY_KEY}"}) as client:
                turn = 0
                while not stop.is_set():
                    base = (clean["a"], clean["b"])[turn % 2]
                    turn += 1
                    body = {"model": model, "prompt": "hi", "max_tokens": 2}
                    try:
                        response = await client.post(f"{base}/v1/completions", json=body)
                    except httpx.HTTPError as exc:
                        errors.append(repr(exc))
                        continue
                    if response.status_code == 200:
                        ok.append(1)
                    else:
                        errors.append(f"{response.status_code} {response.text[:200]}")

        async def scenario() -> dict[str, float]:
            stop, errors, ok = asyncio.Event(), [], []
            clients = [asyncio.create_task(load(stop, errors, ok)) for _ in range(8)]
            await asyncio.sleep(1.0)
            private_redis.stop()
            down_since = time.monotonic()
            await asyncio.sleep(30.0)
            served_while_down = len(ok)
            private_redis.start()
            back = time.monotonic()
            # Shared counters resume: both workers register again in the fresh Redis.
            client = redis.Redis.from_url(private_redis.url)
            while client.zcard("routerpanel:workers") < 2:
                assert time.monotonic() - back < 10, "workers did not come back to Redis"
                await asyncio.sleep(0.05)
            rejoined = time.monotonic() - back
            # Config updates resume: a node added now is used by both workers within a second or so.
            await asyncio.to_thread(add_node, api, second.url, model)
            added = time.monotonic()
            while served(second) < 2:
                assert time.monotonic() - added < 5, "the node added after the outage got no traffic"
                await asyncio.sleep(0.05)
            propagated = time.monotonic() - added
            stop.set()
            await asyncio.gather(*clients)
            assert errors == [], errors[:5]
            return {
                "down_s": back - down_since,
                "served_while_down": served_while_down,
                "rejoined_s": rejoined,
                "propagated_s": propagated,
                "ok": len(ok),
            }

        figures = asyncio.run(scenario())
    print(
        f"\nRedis down {figures['down_s']:.0f} s under load: {figures['ok']} requests ok, 0 errors; "
        f"workers back in Redis after {figures['rejoined_s']:.2f} s; "
        f"a node added afterwards got traffic after {figures['propagated_s']:.2f} s"
    )
    assert figures["served_while_down"] > 100
    assert figures["propagated_s"] < 2.0
