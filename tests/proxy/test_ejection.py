"""Requests waiting on a node that goes out of rotation go elsewhere (``Router.eject``): when the
node is marked unhealthy, when its circuit breaker opens, and when a stream's response headers
never come. Never once the answer started."""

from __future__ import annotations

import asyncio
import time

from proxy import snapshot as snapshots
from proxy.snapshot import PolicyView
from tests.support.wait import wait_until_async

from .conftest import AUTH, call, make_snapshot

CHAT = "/v1/chat/completions"


def chat(**extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


async def waiting_on(proxy_app, node_id: int, count: int = 1) -> None:
    await wait_until_async(
        lambda: len(proxy_app.router._waiting.get(node_id, ())) >= count, 2, f"nothing waited on node {node_id}"
    )


async def test_requests_waiting_on_a_node_marked_unhealthy_are_retried_elsewhere(engines, proxy_app):
    frozen, good = await engines("frozen", mode="hang"), await engines("good")
    snapshot = make_snapshot([{"url": frozen.url}, {"url": good.url}])
    snapshots.install(snapshot)
    started = time.monotonic()
    pending = [
        asyncio.ensure_future(call(proxy_app, "POST", CHAT, json_body=chat(stream=stream), headers=AUTH))
        for stream in (False, True, False, True)
    ]
    await waiting_on(proxy_app, 1, 2)  # round robin: two of the four wait on the frozen node
    unhealthy = make_snapshot([{"url": frozen.url, "health": "unhealthy"}, {"url": good.url}], version=2)
    snapshots.install(unhealthy)
    assert proxy_app.watcher.on_install(unhealthy) == 2  # what the watcher calls with each snapshot
    responses = await asyncio.gather(*pending)
    assert [r.status for r in responses] == [200, 200, 200, 200]
    assert time.monotonic() - started < 2
    assert len(good.received) == 4
    assert proxy_app.router.breakers.nodes[1].failures == 2  # each ejected wait counts against its node
    assert proxy_app.router.load.counts() == {}


async def test_requests_waiting_on_a_node_the_prober_marks_unhealthy_are_retried_elsewhere(engines, proxy_app):
    """Health is live state (docs/decisions/0008-health-as-live-state.md): the prober's verdict
    reaches the routes without a configuration rebuild, and ejects the waiters all the same."""
    frozen, good = await engines("frozen", mode="hang"), await engines("good")
    snapshots.install(make_snapshot([{"url": frozen.url}, {"url": good.url}]))
    pending = [asyncio.ensure_future(call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)) for _ in "ab"]
    await waiting_on(proxy_app, 1)
    health = proxy_app.shared.health
    health.states, health.pending = {1: "unhealthy"}, True  # what ``LiveHealth.refresh`` reads from Redis
    assert await health.apply_due(force=True)
    responses = await asyncio.wait_for(asyncio.gather(*pending), 5)
    assert [(r.status, r.json()["engine"]) for r in responses] == [(200, "good"), (200, "good")]
    assert proxy_app.router.ejected == 1
    assert [t.node.url for t in snapshots.current().routes["m"].hybrid] == [good.url]


async def test_requests_waiting_on_a_node_whose_breaker_opens_are_retried_elsewhere(engines, proxy_app):
    frozen, good = await engines("frozen", mode="hang"), await engines("good")
    snapshots.install(make_snapshot([{"url": frozen.url}, {"url": good.url}]))
    pending = [asyncio.ensure_future(call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)) for _ in "ab"]
    await waiting_on(proxy_app, 1)  # round robin: one of the two waits on the frozen node
    breakers = proxy_app.router.breakers
    for _ in range(breakers.threshold):  # other requests' failures open the node's breaker
        breakers.failure(1)
    responses = await asyncio.gather(*pending)
    assert [(r.status, r.json()["engine"]) for r in responses] == [(200, "good"), (200, "good")]
    assert proxy_app.router.ejected == 1


async def test_a_breaker_opened_by_another_worker_releases_the_waiters_here_too(engines, proxy_app):
    from nodes.live.breakers import BreakerRecord

    frozen, good = await engines("frozen", mode="hang"), await engines("good")
    snapshots.install(make_snapshot([{"url": frozen.url}, {"url": good.url}]))
    pending = [
        asyncio.ensure_future(call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH)) for _ in "ab"
    ]
    await waiting_on(proxy_app, 1)
    proxy_app.router.breakers.adopt({1: BreakerRecord("open", time.time() + 60, time.time())})
    for response in await asyncio.gather(*pending):
        assert response.status == 200
        assert b'"engine": "good"' in response.body


async def test_a_stream_whose_headers_never_come_is_retried_after_the_headers_timeout(engines, proxy_app, settings):
    settings.ROUTERPANEL_PROXY_STREAM_HEADERS_TIMEOUT = 0.3
    frozen, good = await engines("frozen", mode="hang"), await engines("good")
    snapshots.install(make_snapshot([{"url": frozen.url}, {"url": good.url}]))
    started = time.monotonic()
    responses = await asyncio.gather(
        *[call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH) for _ in "ab"]
    )
    for response in responses:  # one of them waited on the frozen node first
        assert response.status == 200
        assert b'"engine": "good"' in response.body
    assert 0.3 <= time.monotonic() - started < 2


async def test_a_silent_node_alone_is_a_504_after_the_headers_timeout_not_the_first_token_timeout(
    engines, proxy_app, settings
):
    settings.ROUTERPANEL_PROXY_STREAM_HEADERS_TIMEOUT = 0.3
    frozen = await engines("frozen", mode="hang")
    snapshots.install(make_snapshot([{"url": frozen.url}], default_policy=PolicyView(first_token_timeout=60)))
    started = time.monotonic()
    response = await call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH)
    assert response.status == 504
    assert "no response headers within 0.3 s" in response.json()["error"]["message"]
    assert time.monotonic() - started < 2


async def test_a_slow_first_token_after_the_headers_is_not_cut_by_the_headers_timeout(engines, proxy_app, settings):
    settings.ROUTERPANEL_PROXY_STREAM_HEADERS_TIMEOUT = 0.2
    slow = await engines("slow", mode="slow_first_token")
    snapshots.install(make_snapshot([{"url": slow.url}]))
    response = await call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH)
    assert response.status == 200
    assert response.body.endswith(b"data: [DONE]\n\n")


async def test_a_stream_that_started_is_never_ejected(engines, proxy_app):
    streaming = await engines("streaming", mode="hang_stream")
    snapshots.install(make_snapshot([{"url": streaming.url}]))
    pending = asyncio.ensure_future(
        call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH, disconnect_after=0.5)
    )
    # The engine has the request and the proxy its first byte (nothing waits on the node any more).
    await wait_until_async(
        lambda: len(streaming.received) == 1 and not proxy_app.router._waiting.get(1), 5, "the stream never started"
    )
    assert proxy_app.router.eject(1) == 0
    response = await pending
    assert response.status == 200
    assert len(streaming.received) == 1
