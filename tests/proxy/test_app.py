"""The lean ASGI app in process, against fake engines on real sockets."""

from __future__ import annotations

import asyncio
import os

from proxy import app as app_module
from proxy import snapshot as snapshots
from proxy.snapshot import PolicyView
from tests.support.garbage import cyclic_garbage
from tests.support.ports import closed_port
from tests.support.wait import wait_until_async

from .conftest import AUTH, call, make_snapshot

CHAT = "/v1/chat/completions"
DEAD = f"http://127.0.0.1:{closed_port()}"  # refuses connections


def chat(model: str = "m", **extra):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def test_it_proxies_a_chat_completion_and_rewrites_only_the_model(engines, proxy_app):
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url, "models": ["served"], "aliases": {"nice": "served"}}]))
    response = await call(
        proxy_app, "POST", CHAT, json_body=chat("nice", temperature=0.5, weird_field={"x": [1, 2]}), headers=AUTH
    )
    assert response.status == 200, response.body
    sent = engine.received[-1]
    assert sent == {
        "model": "served",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.5,
        "weird_field": {"x": [1, 2]},
    }
    assert list(sent) == ["model", "messages", "temperature", "weird_field"]
    assert response.headers["x-routerpanel-node"] == engine.url
    assert len(response.headers["x-request-id"]) == 32
    assert "authorization" not in {k.lower() for k in engine.headers[-1]}


async def test_generated_request_ids_differ_per_request_and_per_process(engines, proxy_app):
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url, "models": ["m"]}]))
    ids = []
    for _ in range(3):
        ids.append((await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)).headers["x-request-id"])
    assert len(set(ids)) == 3
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    # Another process (another worker, or this one after a fork) draws its own half.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, app_module._new_request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    # The child's next id would be the parent's next one if it kept the parent's state.
    parent_next = (await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)).headers["x-request-id"]
    assert len(child) == 32 and child not in {*ids, parent_next}


async def test_it_forwards_the_clients_bytes_unchanged_when_no_rewrite_is_needed(engines, proxy_app):
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url, "models": ["m"]}]))
    raw = b'{"model":"m",  "messages":[{"role":"user","content":"hi"}], "n": 1.0}'
    response = await call(proxy_app, "POST", CHAT, body=raw, headers=AUTH)
    assert response.status == 200
    assert response.json()["echo"] == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 1.0}


async def test_it_propagates_the_request_id_upstream_and_back(engines, proxy_app):
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url}]))
    response = await call(proxy_app, "POST", CHAT, json_body=chat(), headers={**AUTH, "X-Request-Id": "req-123"})
    assert response.headers["x-request-id"] == "req-123"
    assert engine.headers[-1]["X-Request-Id"] == "req-123"


async def test_it_streams_sse_through_byte_for_byte(engines, proxy_app):
    engine = await engines("a", chunks=5)
    snapshots.install(make_snapshot([{"url": engine.url}]))
    response = await call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH)
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    events = response.body.split(b"\n\n")
    assert events[-2] == b"data: [DONE]" and events[-1] == b""
    assert len(events) == 7


async def test_an_engine_error_keeps_its_status_and_body(engines, proxy_app):
    engine = await engines("a", mode="status:400")
    snapshots.install(make_snapshot([{"url": engine.url}]))
    for stream in (False, True):
        response = await call(proxy_app, "POST", CHAT, json_body=chat(stream=stream), headers=AUTH)
        assert response.status == 400
        assert response.json()["error"]["message"] == "a says 400"


async def test_it_retries_a_dead_node_and_a_503_on_other_nodes(engines, proxy_app):
    busy = await engines("busy", mode="status:503")
    good = await engines("good")
    dead_url = DEAD
    snapshots.install(make_snapshot([{"url": dead_url}, {"url": busy.url}, {"url": good.url}]))
    for _ in range(6):
        response = await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)
        assert response.status == 200
        assert response.json()["engine"] == "good"
    assert proxy_app.router.load.counts() == {}


async def test_when_every_node_fails_the_last_engine_answer_is_returned(engines, proxy_app):
    busy = await engines("busy", mode="status:503")
    snapshots.install(make_snapshot([{"url": DEAD}, {"url": busy.url}]))
    response = await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)
    assert response.status == 503
    assert response.json()["error"]["message"] == "busy says 503"


async def test_a_dead_node_alone_is_a_502(proxy_app):
    snapshots.install(make_snapshot([{"url": DEAD}]))
    response = await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)
    assert response.status == 502
    assert response.json()["error"]["code"] == "engine_unreachable"


async def test_the_retry_budget_is_honoured(engines, proxy_app):
    busy = [await engines(f"b{i}", mode="status:503") for i in range(3)]
    snapshots.install(make_snapshot([{"url": b.url} for b in busy], default_policy=PolicyView(retry_budget=1)))
    await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)
    assert sum(len(b.received) for b in busy) == 2


async def test_a_slow_first_token_is_a_504(engines, proxy_app):
    engine = await engines("a", mode="hang")
    snapshots.install(make_snapshot([{"url": engine.url}], default_policy=PolicyView(first_token_timeout=0.2)))
    response = await call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH)
    assert response.status == 504
    assert response.json()["error"]["code"] == "engine_timeout"
    assert proxy_app.router.load.counts() == {}


async def test_a_mid_stream_failure_ends_with_an_error_event_and_done(engines, proxy_app):
    engine = await engines("a", mode="break_stream")
    snapshots.install(make_snapshot([{"url": engine.url}]))
    response = await call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH)
    assert response.status == 200
    events = [e for e in response.body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert events[-2].startswith(b'data: {"error": {')
    assert b'"code": "engine_stream_error"' in events[-2]
    assert proxy_app.router.load.counts() == {}


async def test_a_stream_that_broke_off_gives_no_inter_token_latency_sample(engines, proxy_app):
    # The mean gap between chunks needs the last chunk's time, which a broken stream does not have:
    # a sample of 0 s would drag the histogram down for every engine failure.
    async def samples() -> float:
        text = (await call(proxy_app, "GET", "/metrics")).body.decode()
        prefix = 'routerpanel_proxy_inter_token_latency_seconds_count{model="m"} '
        return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))

    broken, whole = await engines("a", mode="break_stream"), await engines("b")
    snapshots.install(make_snapshot([{"url": broken.url}]))
    before = await samples()
    assert (await call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH)).status == 200
    assert await samples() == before
    snapshots.install(make_snapshot([{"url": whole.url}], version=2))
    assert (await call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH)).status == 200
    assert await samples() == before + 1


async def test_a_client_disconnect_mid_stream_cancels_upstream_and_releases_counters(engines, proxy_app):
    engine = await engines("a", mode="hang_stream")
    snapshots.install(make_snapshot([{"url": engine.url}]))
    response = await call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH, disconnect_after=0.3)
    assert response.status == 200
    assert proxy_app.router.load.counts() == {}
    await wait_until_async(lambda: engine.cancelled, 1, "the engine's request was never cancelled")
    assert engine.cancelled == 1


async def test_a_client_disconnect_while_waiting_for_the_engine_cancels_upstream(engines, proxy_app):
    engine = await engines("a", mode="hang")
    snapshots.install(make_snapshot([{"url": engine.url}]))
    response = await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH, disconnect_after=0.2)
    assert response.status == 0  # nothing was sent
    assert proxy_app.router.load.counts() == {}
    await wait_until_async(lambda: engine.cancelled, 1, "the engine's request was never cancelled")
    assert engine.cancelled == 1


async def test_draining_disabled_and_unhealthy_nodes_get_no_requests(engines, proxy_app):
    good = await engines("good")
    others = [await engines(f"o{i}") for i in range(3)]
    snapshots.install(
        make_snapshot(
            [
                {"url": good.url},
                {"url": others[0].url, "state": "draining"},
                {"url": others[1].url, "state": "disabled"},
                {"url": others[2].url, "health": "unhealthy"},
            ]
        )
    )
    for _ in range(8):
        assert (await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)).status == 200
    assert len(good.received) == 8
    assert all(not o.received for o in others)


async def test_max_concurrency_is_honoured_and_a_full_fleet_is_a_503(engines, proxy_app):
    engine = await engines("a", mode="hang")
    snapshots.install(make_snapshot([{"url": engine.url, "max_concurrency": 1}]))
    first = asyncio.ensure_future(call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH, disconnect_after=0.5))
    await wait_until_async(lambda: engine.received, 5, "the first request never reached the engine")
    second = await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)
    assert second.status == 503
    assert second.json()["error"]["code"] == "no_capacity"
    await first
    assert proxy_app.router.load.counts() == {}


async def test_a_key_that_worked_is_refused_once_it_is_gone_from_the_registry(engines, proxy_app):
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url}], keys={"rp-test-key": {}, "rp-other": {}}))
    assert (await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)).status == 200
    snapshots.install(make_snapshot([{"url": engine.url}], keys={"rp-other": {}}, version=2))
    response = await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)
    assert response.status == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    other = await call(proxy_app, "POST", CHAT, json_body=chat(), headers={"Authorization": "Bearer rp-other"})
    assert other.status == 200


async def test_wrong_keys_are_not_remembered(engines, proxy_app):
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url}]))
    for n in range(20):
        response = await call(proxy_app, "POST", CHAT, json_body=chat(), headers={"Authorization": f"Bearer wrong-{n}"})
        assert response.status == 401
    assert snapshots.current().key_for(b"wrong-\xff") is None  # not UTF-8: no key's hash is of it
    assert not any(token.startswith(b"wrong-") for token in snapshots._DIGESTS)


async def test_errors_have_the_openai_shape_and_status(engines, proxy_app):
    engine = await engines("a")
    snapshots.install(
        make_snapshot(
            [
                {"url": engine.url, "models": ["m", "other"]},
                {"url": DEAD, "models": ["idle"], "state": "draining"},
            ],
            keys={"rp-test-key": {}, "rp-limited": {"allowed_models": ["other"]}, "rp-slow": {"rate_limit_rpm": 1}},
        )
    )
    cases = [
        ({}, chat(), 401, "missing_api_key"),
        ({"Authorization": "Bearer nope"}, chat(), 401, "invalid_api_key"),
        ({"Authorization": "Bearer rp-limited"}, chat(), 403, "model_not_allowed"),
        (AUTH, chat("unknown"), 404, "model_not_found"),
        (AUTH, chat("idle"), 503, "no_routable_node"),
        (AUTH, {"messages": []}, 400, "missing_model"),
        (AUTH, {"model": "m"}, 400, "missing_messages"),
        (AUTH, b"{not json", 400, "invalid_json"),
        (AUTH, b"[1, 2]", 400, "invalid_json"),
    ]
    for headers, body, status, code in cases:
        kwargs = {"body": body} if isinstance(body, bytes) else {"json_body": body}
        response = await call(proxy_app, "POST", CHAT, headers=headers, **kwargs)
        assert response.status == status, (code, response.body)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code"}
        assert error["code"] == code

    slow = {"Authorization": "Bearer rp-slow"}
    assert (await call(proxy_app, "POST", CHAT, headers=slow, json_body=chat())).status == 200
    limited = await call(proxy_app, "POST", CHAT, headers=slow, json_body=chat())
    assert limited.status == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"


async def test_a_body_over_the_limit_is_a_413(engines, proxy_app, settings):
    proxy_app.max_body = 1024
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url}]))
    response = await call(proxy_app, "POST", CHAT, json_body=chat(padding="x" * 2000), headers=AUTH)
    assert response.status == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert not engine.received


async def test_models_lists_each_servable_name_once(engines, proxy_app):
    engine = await engines("a")
    snapshots.install(
        make_snapshot(
            [
                {"url": engine.url, "models": ["m"], "aliases": {"/models/m": "m", "nice": "m"}},
                {"url": "http://127.0.0.1:10", "models": ["m", "n"]},
                {"url": "http://127.0.0.1:11", "models": ["gone"], "state": "gone"},
            ],
            global_aliases=(("everyone", "m"),),
        )
    )
    response = await call(proxy_app, "GET", "/v1/models", headers=AUTH)
    assert response.status == 200
    ids = [m["id"] for m in response.json()["data"]]
    assert ids == sorted(set(ids))
    assert set(ids) == {"m", "n", "nice", "/models/m", "everyone"}
    assert (await call(proxy_app, "GET", "/v1/models")).status == 401


async def test_health_and_metrics_need_no_key(engines, proxy_app):
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url}], version=7))
    await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)
    await call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH)
    health = await call(proxy_app, "GET", "/health")
    assert health.status == 200 and health.json()["snapshot_version"] == 7
    metrics = await call(proxy_app, "GET", "/metrics")
    assert metrics.status == 200
    text = metrics.body.decode()
    assert f'routerpanel_proxy_requests_total{{model="m",node="{engine.url}",status="200"}}' in text
    assert "routerpanel_proxy_request_duration_seconds_bucket" in text
    assert 'routerpanel_proxy_time_to_first_token_seconds_count{model="m"}' in text
    assert 'routerpanel_proxy_inter_token_latency_seconds_count{model="m"}' in text
    assert "routerpanel_proxy_inflight" in text


async def test_a_client_that_leaves_at_once_is_still_noticed_and_fast_answers_start_no_watcher(
    engines, proxy_app, monkeypatch
):
    from proxy import transport

    engine = await engines("a", mode="hang")
    snapshots.install(make_snapshot([{"url": engine.url}]))
    started = asyncio.get_running_loop().time()
    await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH, disconnect_after=0.001)
    assert asyncio.get_running_loop().time() - started < 1.0
    assert proxy_app.router.load.counts() == {}

    fast = await engines("fast")
    snapshots.install(make_snapshot([{"url": fast.url}]))
    starts = []
    original = transport.DisconnectWatcher.start
    monkeypatch.setattr(transport.DisconnectWatcher, "start", lambda self: starts.append(self) or original(self))
    monkeypatch.setattr(transport, "WATCH_DELAY", 0.5)  # far above a fast answer, even on a loaded machine
    for _ in range(5):
        assert (await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)).status == 200
    assert starts == []


async def test_a_watched_request_leaves_no_garbage_cycle(engines, proxy_app):
    # Every request older than the watcher's delay (every real generation) starts a watcher and
    # cancels it at the end; nothing of it may wait for the cyclic garbage collector, whose pauses
    # land on every request in flight.
    from proxy import transport

    engine = await engines("a", mode="slow_first_token")
    snapshots.install(make_snapshot([{"url": engine.url}]))
    # A first request starts this loop's watcher scheduler: the one an earlier test's loop left is
    # garbage of its own (a test-only artefact: a server runs one loop), collected here.
    assert (await call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH)).status == 200
    with cyclic_garbage() as left:
        for _ in range(2):
            response = await call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH)
            assert response.status == 200 and b"[DONE]" in response.body
    assert [kind for kind in left if issubclass(kind, transport.DisconnectWatcher)] == []
