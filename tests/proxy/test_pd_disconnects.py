"""A client that leaves at any moment of a NanoDeploy PD request, in-process, against fake engines
that keep the KV of a prefill whose caller went away (``pd_fakes``)."""

from __future__ import annotations

import pytest

from proxy import snapshot as snapshots
from proxy.snapshot import PolicyView

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
