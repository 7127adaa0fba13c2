"""The data path through real processes: RouterPanel (uvicorn; the tests marked ``servers`` under
daphne too) in front of simulated engines, driven by the official ``openai`` client, httpx and curl."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import time

import httpx
import openai
import pytest

from enginesim.testing import run_simulator
from tests.support.ports import closed_port
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

MODEL = "sim-model"


@pytest.fixture(scope="module")
def sims():
    """Three simulated OpenAI engines serving ``sim-model`` (reset before each test)."""
    with (
        run_simulator(served_model_name=MODEL) as a,
        run_simulator(served_model_name=MODEL) as b,
        run_simulator(served_model_name=MODEL) as c,
    ):
        yield [a, b, c]


@pytest.fixture
def fleet(stack, sims):
    """The three engines registered as hybrid nodes; yields ``(stack, sims, node ids)``."""
    for sim in sims:
        sim.reset()
    ids = [stack.add_node(sim.url, [MODEL], engine_type="openai", settle=False)["id"] for sim in sims]
    stack.settle()
    return stack, sims, ids


def post(stack, body, *, key=None, headers=None, path="/chat/completions", timeout=30):
    auth = {"Authorization": f"Bearer {key or stack.key}"}
    return httpx.post(stack.v1 + path, json=body, headers={**auth, **(headers or {})}, timeout=timeout)


def chat(model=MODEL, **extra):
    return {"model": model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8, **extra}


def served_counts(sims):
    return [sim.stats()["requests"]["by_endpoint"].get("/v1/chat/completions", 0) for sim in sims]


@pytest.mark.servers("uvicorn", "daphne")
def test_the_official_openai_client_works_sync_async_and_streaming(fleet):
    stack, _sims, _ = fleet
    client = openai.OpenAI(base_url=stack.v1, api_key=stack.key, max_retries=0)
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert completion.choices[0].message.content
    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    assert text.choices[0].text
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt="Once", max_tokens=8, stream=True)
        if c.choices
    )
    assert streamed
    assert [m.id for m in client.models.list()] == [MODEL, "/models/sim-model"] or MODEL in [
        m.id for m in client.models.list()
    ]

    async def use_async():
        aclient = openai.AsyncOpenAI(base_url=stack.v1, api_key=stack.key, max_retries=0)
        results = await asyncio.gather(
            *[
                aclient.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4
                )
                for i in range(6)
            ]
        )
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
        )
        chunks = [c async for c in stream]
        await aclient.close()
        return results, chunks

    results, chunks = asyncio.run(use_async())
    assert all(r.choices[0].message.content for r in results)
    assert chunks
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.v1, api_key="rp-wrong", max_retries=0).models.list()


@pytest.mark.servers("uvicorn", "daphne")
def test_curl_streams_sse_with_the_right_headers(fleet):
    stack, _, _ = fleet
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-N",
            "-i",
            stack.v1 + "/chat/completions",
            "-H",
            f"Authorization: Bearer {stack.key}",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(chat(stream=True)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200")
    lowered = head.lower()
    assert "content-type: text/event-stream" in lowered
    assert "cache-control: no-cache" in lowered
    assert "x-accel-buffering: no" in lowered
    assert "x-routerpanel-node: http://127.0.0.1:" in lowered
    assert body.rstrip().endswith("data: [DONE]")


def test_round_robin_spreads_evenly(fleet):
    stack, sims, _ = fleet
    for _ in range(12):
        assert post(stack, chat()).status_code == 200
    assert served_counts(sims) == [4, 4, 4]


def test_weighted_random_follows_weights(fleet):
    stack, sims, ids = fleet
    stack.update_node(ids[0], weight=1, settle=False)
    stack.update_node(ids[1], weight=9, settle=False)
    stack.update_node(ids[2], state="disabled", settle=False)
    stack.set_policy(MODEL, strategy="weighted_random")
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {stack.key}"}) as client:
        for _ in range(100):
            assert client.post(stack.v1 + "/chat/completions", json=chat()).status_code == 200
    light, heavy, disabled = served_counts(sims)
    assert disabled == 0
    assert heavy > 3 * light  # expected 90:10; failing needs light >= 25 (5 standard deviations)


def _concurrently(stack, count, body, headers=None):
    with httpx.Client(timeout=30) as client:
        auth = {"Authorization": f"Bearer {stack.key}", **(headers or {})}

        def one(_):
            return client.post(stack.v1 + "/chat/completions", json=body, headers=auth).status_code

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(one, range(count)))


@pytest.mark.parametrize("strategy", ["least_requests", "power_of_two"])
def test_load_aware_strategies_spread_concurrent_requests(fleet, strategy):
    stack, sims, _ = fleet
    for sim in sims:
        sim.set_faults(slow_first_token_ms=300)
    stack.set_policy(MODEL, strategy=strategy)
    assert _concurrently(stack, 9, chat()) == [200] * 9
    counts = served_counts(sims)
    assert sum(counts) == 9
    assert max(counts) <= (3 if strategy == "least_requests" else 6)


def test_min_observed_latency_avoids_the_slow_node(fleet):
    stack, sims, _ = fleet
    sims[0].set_faults(slow_first_token_ms=150)
    stack.set_policy(MODEL, strategy="min_observed_latency")
    for _ in range(20):
        assert post(stack, chat()).status_code == 200
    slow, fast_a, fast_b = served_counts(sims)
    assert slow <= 2 and fast_a + fast_b >= 18


def test_consistent_hash_keeps_a_session_on_one_node(fleet):
    stack, _sims, _ = fleet
    stack.set_policy(MODEL, strategy="consistent_hash")
    nodes = collections.defaultdict(set)
    for i in range(36):
        session = f"s{i % 12}"
        response = post(stack, chat(), headers={"x-session-id": session}) if i % 2 else post(stack, chat(user=session))
        assert response.status_code == 200
        nodes[session].add(response.headers["x-routerpanel-node"])
    assert all(len(urls) == 1 for urls in nodes.values())
    assert len(set().union(*nodes.values())) >= 2


def test_prefix_cache_sends_a_shared_prefix_to_the_same_node_and_spreads_the_prefixes(fleet):
    # Three system prompts that share their first 16 characters: their first requests all match the
    # first one's node. Once that node has had more than its share, the others move off it, each to
    # a node of its own, and stay there (docs/cache-routing.md).
    stack, _sims, _ = fleet
    stack.set_policy(MODEL, strategy="prefix_cache", prefix_min_match=16)
    chosen = collections.defaultdict(list)
    for i in range(24):
        system = f"You are assistant number {i % 3}. " * 20
        body = {
            "model": MODEL,
            "max_tokens": 4,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}],
        }
        response = post(stack, body)
        assert response.status_code == 200
        chosen[i % 3].append(response.headers["x-routerpanel-node"])
    settled = {group: set(urls[4:]) for group, urls in chosen.items()}
    assert all(len(urls) == 1 for urls in settled.values()), chosen
    assert len(set().union(*settled.values())) == 3, chosen


def test_alias_is_rewritten_and_unknown_fields_pass_through(fleet):
    stack, sims, _ = fleet
    stack.add_alias("friendly-name", MODEL)
    body = chat("friendly-name", temperature=0.25, routerpanel_unknown={"nested": [1, "two"]}, seed=7)
    response = post(stack, body, headers={"x-request-id": "e2e-req-1"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "e2e-req-1"
    served = [r for sim in sims for r in sim.requests() if r["path"] == "/v1/chat/completions"]
    assert len(served) == 1
    sent = served[0]["body"]
    assert sent == {**body, "model": MODEL}
    assert served[0]["headers"]["x-request-id"] == "e2e-req-1"
    assert "authorization" not in served[0]["headers"]
    assert "friendly-name" in [
        m["id"]
        for m in httpx.get(stack.v1 + "/models", headers={"Authorization": f"Bearer {stack.key}"}).json()["data"]
    ]


@pytest.mark.servers("uvicorn", "daphne")
def test_each_error_status_has_the_openai_shape(fleet):
    stack, _sims, _ids = fleet
    limited_key = stack.add_key(rate_limit_rpm=1)
    other_key = stack.add_key(allowed_models=["something-else"])
    with run_simulator(served_model_name="dead-model") as dying:  # healthy when registered, dead when asked
        stack.add_node(dying.url, ["dead-model"], settle=False)
    stack.add_node(f"http://127.0.0.1:{closed_port(1)}", ["drained-model"], state="draining")
    assert post(stack, chat(), key=limited_key).status_code == 200
    # The limit counts per clock minute: a minute may turn between two of these three requests, never
    # between both pairs, so one of the two that follow the first is over the limit.
    over_limit = [post(stack, chat(), key=limited_key) for _ in range(2)]
    refused = next((response for response in over_limit if response.status_code == 429), over_limit[-1])
    cases = [
        (httpx.post(stack.v1 + "/chat/completions", json=chat(), timeout=10), 401),
        (post(stack, chat(), key="rp-not-a-key"), 401),
        (post(stack, chat(), key=other_key), 403),
        (post(stack, chat("no-such-model")), 404),
        (
            httpx.post(
                stack.v1 + "/chat/completions",
                content=b"{oops",
                timeout=10,
                headers={"Authorization": f"Bearer {stack.key}"},
            ),
            400,
        ),
        (post(stack, {"model": MODEL}), 400),
        (post(stack, chat(padding="x" * (5 * 1024 * 1024))), 413),
        (refused, 429),
        (post(stack, chat("dead-model")), 502),
        (post(stack, chat("drained-model")), 503),
    ]
    with run_simulator(served_model_name="hang-model", extra_args=["--hang"]) as hanging:
        stack.add_node(hanging.url, ["hang-model"], settle=False)
        stack.set_policy("hang-model", first_token_timeout=0.5, retry_budget=0)
        cases.append((post(stack, chat("hang-model", stream=True)), 504))
    for response, status in cases:
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "code"}
        if status == 429:
            assert 1 <= int(response.headers["retry-after"]) <= 60


def test_a_dead_node_is_retried_with_no_client_visible_errors(fleet):
    stack, sims, _ids = fleet
    with run_simulator(served_model_name=MODEL) as dying:  # healthy when registered (no prober runs here)
        stack.add_live_node(dying.url, [MODEL])
    sims[1].set_faults(error_rate=1.0, error_status=503)
    statuses = [post(stack, chat()).status_code for _ in range(20)]
    assert statuses == [200] * 20
    metrics = httpx.get(stack.base + "/metrics", timeout=5).text
    assert "routerpanel_proxy_retries_total" in metrics


def test_a_mid_stream_failure_ends_with_an_error_event_then_done(fleet):
    stack, sims, _ids = fleet
    for sim in sims:
        sim.set_faults(close_after_chunks=2, count=1)
    response = post(stack, chat(stream=True, max_tokens=16))
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_stream_error"


@pytest.mark.servers("uvicorn", "daphne")
def test_a_client_disconnect_while_waiting_for_the_first_token_cancels_upstream(fleet):
    stack, sims, _ids = fleet
    for sim in sims:
        sim.set_faults(slow_first_token_ms=5000, count=1)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up (and closes) before the first token
        post(stack, chat(stream=True), timeout=httpx.Timeout(10, read=0.5))
    wait_until(
        lambda: sum(sim.stats()["requests"]["cancelled"] for sim in sims) >= 1,
        3,
        "no engine saw its request cancelled",
    )


@pytest.mark.servers("uvicorn", "daphne")
def test_a_client_disconnect_mid_stream_cancels_upstream(stack):
    with run_simulator(served_model_name="paced", itl_ms=20) as paced:
        # The engine type is given: a detection's requests would count as completed below; and the
        # health probes' requests are reset away for the same reason.
        stack.add_live_node(paced.url, ["paced"], engine_type="openai")
        paced.reset()
        with (
            httpx.Client(timeout=30) as client,
            client.stream(
                "POST",
                stack.v1 + "/chat/completions",
                json=chat("paced", stream=True, max_tokens=500),
                headers={"Authorization": f"Bearer {stack.key}"},
            ) as response,
        ):
            assert response.status_code == 200
            next(response.iter_raw())
        stats = paced.wait_for(lambda s: s["requests"]["cancelled"] + s["requests"]["completed"] >= 1, timeout=5)
        assert stats["requests"]["cancelled"] == 1
        metrics = httpx.get(stack.base + "/metrics", timeout=5).text
        assert f'routerpanel_proxy_inflight{{node="{paced.url}"}}' not in metrics or (
            f'routerpanel_proxy_inflight{{node="{paced.url}"}} 0.0' in metrics
        )


# alone: on two cores shared with the parallel run's other stacks, the change arrived and was
# polled for in 1.1 s once (the bound is the watcher's promise, measured on a machine to itself).
@pytest.mark.alone
def test_a_configuration_change_reaches_the_running_worker_within_a_second(fleet):
    stack, sims, ids = fleet
    before = stack.snapshot_version()
    started = time.monotonic()
    stack.update_node(ids[0], state="draining", settle=False)
    stack.update_node(ids[1], state="draining", settle=False)
    waited = stack.settle(timeout=3)
    assert stack.snapshot_version() > before
    assert waited < 1.0 and time.monotonic() - started < 3
    for sim in sims:
        sim.reset()
    for _ in range(6):
        assert post(stack, chat()).headers["x-routerpanel-node"] == sims[2].url
    assert served_counts(sims) == [0, 0, 6]
