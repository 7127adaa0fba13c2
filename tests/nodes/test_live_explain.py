"""The request explanations' store on a real Redis: appended in batches by a worker's explainer,
capped by count and age, read back newest first with filters and a cursor, found by request id, and
tailed; a Redis that is down costs the records (counted), never an exception in a request."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgpack
import pytest
import redis as redis_lib
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from nodes.live import explain as live
from nodes.live import explain_store as store
from nodes.live import keys
from proxy.explain import Explainer
from proxy.request import Outcome
from proxy.shared import SharedCounters

from .explain_records import explanation, flush_all


@pytest.fixture
def sync_client(redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


async def test_a_flush_appends_one_entry_per_request_in_one_call(redis_url, sync_client):
    explainer = Explainer(batch=1000)
    await flush_all(redis_url, explainer, [explanation(f"r{i}") for i in range(30)])
    assert sync_client.xlen(keys.EXPLAIN) == 30 and explainer.stored == 30
    page = store.read_page(sync_client, store.RequestFilter(), limit=10)
    assert [r["id"] for r in page.records] == [f"r{i}" for i in range(29, 19, -1)]  # newest first
    older = store.read_page(sync_client, store.RequestFilter(), before=page.cursor, limit=25)
    assert [r["id"] for r in older.records] == [f"r{i}" for i in range(19, -1, -1)]
    assert older.cursor is None


async def test_one_turn_of_the_workers_loop_stores_every_full_batch(redis_url, sync_client):
    """Small batches keep a worker's memory low; the loop must still keep up with any request rate."""
    counters = SharedCounters(redis_url, worker="w1")
    counters.explainer = Explainer(batch=10)
    for i in range(35):
        counters.explainer.finish(explanation(f"r{i}"), Outcome(status=200))
    try:
        await counters.tick()
        # Every full batch in one turn; the last 5 wait for the flush interval.
        assert sync_client.xlen(keys.EXPLAIN) == 30 and len(counters.explainer.buffer) == 5
    finally:
        await counters.stop()


def test_a_batch_is_stored_byte_for_byte_under_its_request_ids(sync_client):
    """The batch travels as one MessagePack argument (``APPEND_SCRIPT``): every byte value of a
    record, including ones that are not UTF-8, reaches the stream unchanged."""
    records = [("a", bytes(range(256))), ("b", b"\x00\xc1\xff" * 100), ("c", b"")]
    assert sync_client.eval(*live.append_args(records, max_records=1000, oldest_ms=0)) == 3
    entries = sync_client.xrange(keys.EXPLAIN)
    assert [fields[b"r"] for _, fields in entries] == [payload for _, payload in records]
    assert sync_client.zrange(keys.EXPLAIN_IDS, 0, -1) == [b"a", b"b", b"c"]


async def test_filters_select_by_model_node_key_status_and_time(redis_url, sync_client):
    started = time.time()
    items = [
        explanation("a", model="x", node=1, status=200, key="alice"),
        explanation("b", model="y", node=2, status=503, key="bob"),
        explanation("c", model="x", node=3, status=404, key="bob"),
    ]
    await flush_all(redis_url, Explainer(), items)

    def ids(**wanted) -> list[str]:
        return [r["id"] for r in store.read_page(sync_client, store.RequestFilter(**wanted)).records]

    assert ids(model="x") == ["c", "a"]
    assert ids(node=2) == ["b"]
    assert ids(key="bob") == ["c", "b"]
    assert ids(status="5xx") == ["b"] and ids(status="404") == ["c"] and ids(status="error") == ["c", "b"]
    assert ids(since=started - 5, until=time.time() + 5) == ["c", "b", "a"]
    assert ids(since=time.time() + 3600) == [] and ids(until=started - 3600) == []


async def test_a_request_is_found_by_its_id_and_tailed_after_the_last_entry_seen(redis_url, sync_client):
    await flush_all(redis_url, Explainer(), [explanation("first"), explanation("second")])
    found = store.find(sync_client, "first")
    assert found is not None and found["id"] == "first" and found["choices"][0]["pick"]["url"] == "http://n1:8000"
    assert store.find(sync_client, "missing") is None
    client = aioredis.Redis.from_url(redis_url)
    try:
        start = await store.newest_entry(client)
        assert start == store.newest_entry_sync(sync_client)
        await flush_all(redis_url, Explainer(), [explanation("third", model="z"), explanation("fourth")])
        records, last, skipped = await store.read_after(client, start, store.RequestFilter(model="z"))
        assert [r["id"] for r in records] == ["third"] and not skipped
        assert await store.read_after(client, last, store.RequestFilter()) == ([], last, False)
        await flush_all(redis_url, Explainer(), [explanation(f"burst{i}") for i in range(12)])
        records, _, skipped = await store.read_after(client, last, store.RequestFilter(), count=5)
        assert skipped and [r["id"] for r in records] == [f"burst{i}" for i in range(7, 12)]
    finally:
        await client.aclose()


async def test_the_stream_is_capped_by_count_and_by_age(redis_url, sync_client):
    sync_client.config_set("stream-node-max-entries", 10)  # so the approximate trims bite on a small stream
    try:
        await flush_all(redis_url, Explainer(max_records=100), [explanation(f"r{i}") for i in range(400)])
        assert 100 <= sync_client.xlen(keys.EXPLAIN) <= 110
        assert sync_client.zcard(keys.EXPLAIN_IDS) == 100
        assert store.find(sync_client, "r399") is not None and store.find(sync_client, "r0") is None
        time.sleep(0.01)
        await flush_all(redis_url, Explainer(retention=0.005), [explanation("newest")])
        assert sync_client.xlen(keys.EXPLAIN) <= 11  # everything older than 5 ms went, in whole nodes
        assert sync_client.zrange(keys.EXPLAIN_IDS, 0, -1) == [b"newest"]
    finally:
        sync_client.config_set("stream-node-max-entries", 100)


async def test_a_redis_that_is_down_costs_the_batch_counted_never_a_request():
    explainer = Explainer()
    explainer.finish(explanation("lost"), Outcome(status=200))
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    with pytest.raises(RedisConnectionError):
        await explainer.flush(client)
    await client.aclose()
    assert explainer.dropped == 1 and explainer.buffer == []


def test_values_that_are_not_records_of_this_version_are_skipped():
    assert live.decode(b"not msgpack \xc1") is None
    assert live.decode(msgpack.packb({"a": 1})) is None
    assert live.decode(msgpack.packb([99, "id"] + [None] * 16)) is None
    wire = list(explanation("ok").wire())
    assert live.decode(live.encode(tuple(wire))) is not None  # type: ignore[arg-type]
    wire[10] = [["hybrid"]]  # a choice cut short
    assert live.decode(live.encode(tuple(wire))) is None  # type: ignore[arg-type]


def _version_1(request_id: str, model: str, key: str) -> bytes:
    """A record as RouterPanel wrote it before version 2 (MessagePack), still in a stream after an
    upgrade until it ages out."""
    url = "http://n1:8000"
    return msgpack.packb(
        [
            1,
            request_id,
            time.time(),
            key,
            model,
            "/v1/chat/completions",
            False,
            "hybrid",
            "",
            "round_robin",
            [
                [
                    "hybrid",
                    2,
                    1,
                    [1, url],
                    model,
                    [[1, url, 3, 1, 0.25, None]],
                    [["draining", 1, [[4, "http://n4:8000"]]]],
                ]
            ],
            [["hybrid", 1, url, 0.001, 0.002, 200, None, None, True]],
            0.004,
            200,
            None,
            None,
            b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}',
            url,
        ]
    )


async def test_records_of_the_previous_version_are_still_read_filtered_and_found(redis_url, sync_client):
    """After an upgrade the stream holds both versions until the old records age out: the Requests
    page, its filters and the lookup by id read them the same."""
    sync_client.eval(*live.append_args([("old", _version_1("old", "x", "alice"))], max_records=1000, oldest_ms=0))
    await flush_all(redis_url, Explainer(), [explanation("new", model="x", key="bob")])
    old = store.find(sync_client, "old")
    assert old is not None and old["model"] == "x" and old["key"] == "alice"
    assert old["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    (choice,) = old["choices"]
    assert choice["pick"] == {"node": 1, "url": "http://n1:8000"} and choice["candidates"][0]["latency_ms"] == 250.0
    assert choice["excluded"] == [{"reason": "draining", "count": 1, "nodes": [{"node": 4, "url": "http://n4:8000"}]}]
    assert old["retries"] == 0 and old["node"] == {"node": 1, "url": "http://n1:8000"}

    def ids(**wanted) -> list[str]:
        return [r["id"] for r in store.read_page(sync_client, store.RequestFilter(**wanted)).records]

    assert ids(model="x") == ["new", "old"] and ids(key="alice") == ["old"] and ids(key="bob") == ["new"]


async def test_names_and_ids_with_quotes_backslashes_and_accents_are_filtered_and_found(redis_url, sync_client):
    """The reader looks for a name in a record's bytes before decoding it: how JSON writes a text
    (escaped quotes and backslashes, accents as they are) must not hide a record."""
    odd = 'a "quoted"\\ modèle ☃'
    await flush_all(
        redis_url, Explainer(), [explanation(odd, model=odd, key=odd), explanation("plain", model="m", key="k")]
    )
    found = store.find(sync_client, odd)
    assert found is not None and found["id"] == odd and found["model"] == odd and found["key"] == odd
    assert [r["id"] for r in store.read_page(sync_client, store.RequestFilter(model=odd, key=odd)).records] == [odd]
    assert [r["id"] for r in store.read_page(sync_client, store.RequestFilter(model="m")).records] == ["plain"]
