"""NanoDeploy KV releases: gathered per prefill node into one ``/pd/free`` call, never waited for by
the request, still sent when the client leaves, counted, and sent before the worker shuts down
(docs/pd.md, "Nothing leaks")."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy import snapshot as snapshots
from proxy.pd import cleanup
from proxy.pd import metrics as pd_metrics
from proxy.snapshot import PolicyView
from tests.support.wait import wait_until_async

from .conftest import AUTH, call, make_snapshot
from .pd_fakes import CHAT, fake_pd, pd_nodes, settled

__all__ = ["fake_pd"]

POLICY = PolicyView(serving_mode="pd", first_token_timeout=5.0, total_timeout=10.0)


def chat(stream: bool = False) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": stream}


async def shut_down(app) -> None:
    """What uvicorn does when a worker stops: the ASGI lifespan's shutdown."""
    messages = iter([{"type": "lifespan.shutdown"}])

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        assert message["type"] == "lifespan.shutdown.complete"

    await app.lifespan(receive, send)


async def test_the_frees_of_concurrent_requests_go_to_their_prefill_node_in_one_call(fake_pd, proxy_app, monkeypatch):
    monkeypatch.setattr(cleanup, "FREE_WINDOW", 0.5)  # wide enough for a loaded machine to end them all in it
    engines, prefills, decodes = await fake_pd()
    snapshots.install(make_snapshot(pd_nodes(prefills, decodes), default_policy=POLICY))
    answers = await asyncio.gather(*(call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH) for _ in range(8)))
    assert [a.status for a in answers] == [200] * 8
    await settled(proxy_app)

    assert len(engines.free_calls) == 1, engines.free_calls
    assert sorted(engines.free_calls[0]) == sorted(range(1024, 1032))
    assert engines.held == set() and engines.freed == 8 and engines.double_frees == 0


async def test_each_prefill_node_gets_its_own_call_and_every_release_is_counted(fake_pd, proxy_app, monkeypatch):
    monkeypatch.setattr(cleanup, "FREE_WINDOW", 0.5)
    engines, prefills, decodes = await fake_pd(prefills=2)
    snapshots.install(make_snapshot(pd_nodes(prefills, decodes), default_policy=POLICY))
    before = pd_metrics.FREES.values.get(("ok",), 0)
    await asyncio.gather(*(call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH) for _ in range(6)))
    await settled(proxy_app)

    assert sorted(len(ids) for ids in engines.free_calls) == [3, 3]  # round robin: three requests per node
    assert engines.held == set() and engines.double_frees == 0
    assert pd_metrics.FREES.values.get(("ok",), 0) - before == 6


async def test_a_full_call_goes_out_at_once_and_later_releases_start_the_next(fake_pd, proxy_app, monkeypatch):
    monkeypatch.setattr(cleanup, "FREE_WINDOW", 60.0)  # only a full call goes out before the end
    monkeypatch.setattr(cleanup, "FREE_BATCH_MAX", 2)
    engines, prefills, decodes = await fake_pd()
    snapshots.install(make_snapshot(pd_nodes(prefills, decodes), default_policy=POLICY))
    await asyncio.gather(*(call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH) for _ in range(5)))
    await wait_until_async(lambda: len(engines.free_calls) == 2, 5, "the full calls were not sent")
    assert [len(ids) for ids in engines.free_calls] == [2, 2] and len(engines.held) == 1
    await cleanup.finish()
    assert [len(ids) for ids in engines.free_calls] == [2, 2, 1] and engines.held == set()


async def test_a_request_does_not_wait_for_its_free(fake_pd, proxy_app, monkeypatch):
    monkeypatch.setattr(cleanup, "FREE_WINDOW", 3.0)
    engines, prefills, decodes = await fake_pd()
    snapshots.install(make_snapshot(pd_nodes(prefills, decodes), default_policy=POLICY))
    started = time.monotonic()
    response = await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)
    assert response.status == 200 and time.monotonic() - started < 2.0
    assert len(engines.held) == 1 and cleanup.pending_cleanups() == 1  # the release is still gathering
    await settled(proxy_app)
    assert engines.free_calls == [[1024]] and engines.held == set()


@pytest.mark.parametrize("leave_after", [0.01, 0.1], ids=["during-prefill", "during-decode"])
async def test_a_free_is_still_sent_and_counted_after_the_client_left(fake_pd, proxy_app, leave_after):
    engines, prefills, decodes = await fake_pd()
    snapshots.install(make_snapshot(pd_nodes(prefills, decodes), default_policy=POLICY))
    before = pd_metrics.FREES.values.get(("ok",), 0)
    await call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH, disconnect_after=leave_after)
    await settled(proxy_app)

    assert engines.allocated == 1 and engines.free_calls == [[1024]] and engines.held == set()
    assert pd_metrics.FREES.values.get(("ok",), 0) - before == 1


async def test_shutdown_sends_the_frees_still_gathering(fake_pd, proxy_app, monkeypatch):
    monkeypatch.setattr(cleanup, "FREE_WINDOW", 60.0)  # would outlive the worker without the shutdown's flush
    engines, prefills, decodes = await fake_pd()
    snapshots.install(make_snapshot(pd_nodes(prefills, decodes), default_policy=POLICY))
    await asyncio.gather(*(call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH) for _ in range(3)))
    assert len(engines.held) == 3

    started = time.monotonic()
    await shut_down(proxy_app)
    assert time.monotonic() - started < 5.0
    assert engines.held == set() and len(engines.free_calls) == 1 and cleanup.pending_cleanups() == 0


async def test_shutdown_waits_for_a_prefill_whose_client_left_and_frees_its_kv(fake_pd, proxy_app):
    engines, prefills, decodes = await fake_pd()
    engines.prefill_delay = 0.3
    snapshots.install(make_snapshot(pd_nodes(prefills, decodes), default_policy=POLICY))
    await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH, disconnect_after=0.05)
    assert engines.allocated == 1 and engines.freed == 0  # the prefill is still computing

    await shut_down(proxy_app)
    assert engines.prefill_cancelled == 0 and engines.held == set() and engines.free_calls == [[1024]]
    assert cleanup.pending_cleanups() == 0


async def test_a_prefill_cancelled_at_shutdown_releases_nothing_and_raises_nothing():
    """``finish`` may outlive a prefill cancelled by the loop's shutdown: its release is skipped
    quietly (there is no answer, so no KV id), rather than raising CancelledError out of a clean-up."""
    from proxy.pd.flows import _release

    prefill = asyncio.ensure_future(asyncio.sleep(60))
    prefill.cancel()
    await asyncio.wait({prefill})
    _release(object(), object(), prefill)  # type: ignore[arg-type]  # neither is touched


async def test_clean_ups_run_as_named_tracked_tasks_and_a_task_factory_makes_them() -> None:
    gate = asyncio.Event()
    task = cleanup.spawn(gate.wait(), "routerpanel-test-cleanup")
    assert task.get_name() == "routerpanel-test-cleanup"
    assert cleanup.pending_cleanups() >= 1
    gate.set()
    await task
    assert task not in cleanup._background

    loop = asyncio.get_running_loop()
    made: list[str] = []

    def factory(loop: asyncio.AbstractEventLoop, coro, **options) -> asyncio.Task:
        made.append("factory")
        return asyncio.Task(coro, loop=loop, **options)

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        task = cleanup.spawn(asyncio.sleep(0), "routerpanel-test-cleanup")
        await task
    finally:
        loop.set_task_factory(None)
    assert made == ["factory"] and task.get_name() == "routerpanel-test-cleanup"
