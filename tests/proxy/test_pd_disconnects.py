"""A client that leaves at any moment of a NanoDeploy PD request, in-process, against fake engines
that keep the KV of a prefill whose caller went away (``pd_fakes``)."""

from __future__ import annotations

import asyncio
import gc

import pytest

from proxy import snapshot as snapshots
from proxy.pd import engines as pd_engines
from proxy.snapshot import PolicyView
from tests.support.wait import wait_until_async

from .conftest import AUTH, call, make_snapshot
from .pd_fakes import CHAT, fake_pd, pd_nodes, settled

__all__ = ["fake_pd"]

# Moments the client leaves: at once, while the prefill computes, around its answer, during the
# decode stream, after the end (None: never).
MOMENTS = [0.0, 0.01, 0.03, 0.05, 0.07, 0.09, 0.12, 0.16, 0.25, None]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("leave_after", MOMENTS)
async def test_every_prefilled_kv_is_freed_exactly_once_whenever_the_client_leaves(
    fake_pd, proxy_app, stream, leave_after
):
    engines, prefills, decodes = await fake_pd()
    policy = PolicyView(serving_mode="pd", first_token_timeout=5.0, total_timeout=10.0)
    snapshots.install(make_snapshot(pd_nodes(prefills, decodes), default_policy=policy))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": stream}
    response = await call(proxy_app, "POST", CHAT, json_body=body, headers=AUTH, disconnect_after=leave_after)
    await settled(proxy_app)

    assert engines.allocated in (0, 1)
    assert engines.held == set(), "a prefilled KV block was never freed"
    assert engines.freed == engines.allocated and engines.double_frees == 0
    assert engines.prefill_cancelled == 0, "the prefill call was abandoned with its KV"
    if leave_after is None:
        assert response.status == 200
        assert response.headers["x-routerpanel-node"] == f"prefill={prefills[0]}; decode={decodes[0]}"
        assert engines.decodes == 1


class _DecodeFrees(pd_engines.NanoDeployPd):
    """A protocol whose decode releases the prefill's KV (as vLLM's read does): the router never
    reads a prefill's outcome to free anything."""

    frees_kv = False


async def test_a_prefill_that_fails_after_its_client_left_leaves_no_unread_error(fake_pd, proxy_app, monkeypatch):
    monkeypatch.setitem(pd_engines.TWO_STAGE, "nanodeploy", _DecodeFrees())
    engines, prefills, decodes = await fake_pd()
    engines.prefill_delay = 0.5  # longer than the prefill's bound below: it ends in a timeout
    policy = PolicyView(serving_mode="pd", first_token_timeout=0.2, total_timeout=10.0)
    snapshots.install(make_snapshot(pd_nodes(prefills, decodes), default_policy=policy))
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, context: reported.append(context))
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        await call(proxy_app, "POST", CHAT, json_body=body, headers=AUTH, disconnect_after=0.05)
        await settled(proxy_app)
        # The prefill's call timed out after the client left; the engine learns it once its side of
        # the closed connection is read, which may come after the proxy's clean-ups.
        await wait_until_async(lambda: engines.prefill_cancelled == 1, 10, "the prefill's call never ended")
        gc.collect()  # an outcome nobody read is reported when its task is collected
    finally:
        loop.set_exception_handler(previous)
    assert [context["message"] for context in reported] == []
