"""API keys never reach the logs, whatever happens to the request."""

from __future__ import annotations

import logging

from proxy import snapshot as snapshots

from .conftest import API_KEY, call, make_snapshot


async def test_keys_are_never_logged(proxy_app, engines, caplog) -> None:
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url, "models": ["m"]}]))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    wrong = "rp-wrong-key-that-must-not-be-logged"
    with caplog.at_level(logging.DEBUG):
        await call(
            proxy_app, "POST", "/v1/chat/completions", json_body=body, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        await call(
            proxy_app, "POST", "/v1/chat/completions", json_body=body, headers={"Authorization": f"Bearer {wrong}"}
        )
        await call(proxy_app, "POST", "/v1/chat/completions", body=b"{", headers={"Authorization": f"Bearer {API_KEY}"})
    assert caplog.records  # something was logged, so the check below means something
    assert API_KEY not in caplog.text and wrong not in caplog.text
