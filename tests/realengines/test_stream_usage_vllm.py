"""A real vLLM stream through RouterPanel, whose client did not ask for usage: RouterPanel asks vLLM
for it (to count the key's tokens) and the client still gets exactly the bytes vLLM sends a client
that did not ask (proxy/usage.py, docs/usage.md). Greedy decoding (temperature 0) on one server
makes two runs of one request the same bytes, but for ``created`` when a second turns between them,
and but for the rare run where vLLM on CPU picks another token: the first run of a prompt computes
it whole, a later one reads its prefix cache, and a near tie can fall the other way. So the test
warms the cache before it compares, and compares again when the pair differs: RouterPanel altering
the stream differs on every try.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
import redis

from nodes.live import budgets as live_budgets
from nodes.live import keys
from tests.realengines.harness import VllmServer, wait_until
from tests.support.stack import RouterPanelStack

pytestmark = [pytest.mark.real_engine, pytest.mark.e2e]


def _same_clock(stream: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b'"created":0', stream)


def _created(stream: bytes) -> set[int]:
    return {json.loads(line[6:])["created"] for line in stream.split(b"\n\n") if line.startswith(b"data: {")}


@pytest.mark.parametrize(
    ("path", "prompt"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Write a short line about the sea."}]}),
        ("/v1/completions", {"prompt": "The sea is a place where"}),
    ],
    ids=["chat", "completions"],
)
def test_a_vllm_stream_through_routerpanel_is_byte_for_byte_the_stream_without_usage(
    routerpanel: RouterPanelStack, vllm_pair: tuple[VllmServer, VllmServer], path: str, prompt: dict
) -> None:
    server = vllm_pair[0]
    routerpanel.add_node(server.url, [server.model], role="hybrid", engine_type="vllm")
    name = "usage" + path.replace("/", "-")
    token = routerpanel.add_key(name=name)
    rows = routerpanel.api.get("/api/api-keys/", params={"limit": 1000}).json()["results"]
    key_id = next(row["id"] for row in rows if row["name"] == name)
    body = {"model": server.model, **prompt, "stream": True, "max_tokens": 12, "temperature": 0}
    auth = {"Authorization": f"Bearer {token}"}
    httpx.post(server.url + path, json=body, timeout=120).raise_for_status()  # the prompt in vLLM's cache
    for attempt in range(5):  # again when the pair differs (a second turned, or another token)
        request_id = {"X-Request-Id": f"usage-{name}-{attempt}"}  # vLLM names the chunks after it
        direct = httpx.post(server.url + path, json=body, headers=request_id, timeout=120)
        through = httpx.post(routerpanel.base + path, json=body, headers={**request_id, **auth}, timeout=120)
        if through.content == direct.content:
            break
    assert direct.status_code == through.status_code == 200
    assert b'"usage"' not in direct.content and b'"system_fingerprint"' in direct.content
    # On a loaded machine each request may take over a second, so ``created`` (vLLM's clock when the
    # request arrived) can differ on every try: every other byte must still be the same.
    assert _same_clock(through.content) == _same_clock(direct.content)
    if _created(direct.content) == _created(through.content):
        assert through.content == direct.content

    client = redis.Redis.from_url(routerpanel.redis_url)
    day = keys.tokens_day_key(live_budgets.day_of(time.time()))
    wait_until(lambda: int(client.hget(day, str(key_id)) or 0) > 12, timeout=5, message="the tokens were not counted")
