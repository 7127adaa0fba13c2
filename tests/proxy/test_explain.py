"""Request explanations, built in process against fake engines: every exclusion reason, retries and
their reasons, the PD legs, usage, the one-line summary header, and the bounds on a large route."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from typing import Any

import pytest
from aiohttp import web

from nodes.live import explain as live
from proxy import hybrid as proxy_hybrid
from proxy import relay as proxy_relay
from proxy import snapshot as snapshots
from proxy.breaker import HALF_OPEN
from proxy.explain import Explainer, Explanation
from proxy.request import Outcome
from proxy.snapshot import PolicyView

from .conftest import AUTH, call, make_snapshot
from .pd_fakes import CHAT, fake_pd, pd_nodes, settled

__all__ = ["fake_pd"]

DEAD = "http://127.0.0.1:9"  # the discard port: connection refused


def chat(model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def last_record(app: Any) -> live.Record:
    """The newest buffered explanation, through the wire codec as a reader would see it."""
    record = live.decode(app.explainer.buffer[-1], "1-0")
    assert record is not None
    return record


def excluded(choice: live.Choice) -> dict[str, tuple[int, list[str]]]:
    return {e["reason"]: (e["count"], [n["url"] for n in e["nodes"]]) for e in choice["excluded"]}


async def test_a_plain_request_records_its_route_pick_candidates_and_timings(engines, proxy_app):
    a, b = await engines("a"), await engines("b")
    policy = PolicyView(strategy="least_requests")
    snapshots.install(make_snapshot([{"url": a.url, "weight": 3}, {"url": b.url}], default_policy=policy))
    response = await call(proxy_app, "POST", CHAT, json_body=chat(), headers={**AUTH, "X-Request-Id": "req-1"})
    assert response.status == 200
    record = last_record(proxy_app)
    assert (record["id"], record["key"], record["model"], record["path"]) == ("req-1", "key1", "m", CHAT)
    assert (record["mode"], record["policy"], record["strategy"]) == ("hybrid", "", "least_requests")
    assert (record["status"], record["error"], record["retries"]) == (200, None, 0)
    [choice] = record["choices"]
    assert (choice["role"], choice["in_rotation"], choice["available"], choice["excluded"]) == ("hybrid", 2, 2, [])
    assert choice["pick"] is not None and choice["pick"]["url"] == response.headers["x-routerpanel-node"]
    assert choice["served_name"] == "m"
    assert choice["candidates"][0]["url"] == choice["pick"]["url"]
    assert {c["url"]: c["weight"] for c in choice["candidates"]} == {a.url: 3, b.url: 1}
    assert all(c["inflight"] == 0 for c in choice["candidates"])
    [attempt] = record["attempts"]
    assert (attempt["url"], attempt["status"], attempt["verdict"], attempt["retry"]) == (
        choice["pick"]["url"],
        200,
        True,
        None,
    )
    assert 0 <= attempt["started_ms"] <= record["total_ms"] and attempt["duration_ms"] <= record["total_ms"]
    assert record["ttfb_ms"] == record["total_ms"] > 0
    assert record["node"] == choice["pick"]


async def test_every_reason_a_node_was_left_out_is_named(engines, proxy_app):
    good = await engines("good")
    nodes = [
        {"url": good.url},
        {"url": "http://127.0.0.1:10002", "state": "draining"},
        {"url": "http://127.0.0.1:10003", "state": "disabled"},
        {"url": "http://127.0.0.1:10004", "state": "pending"},
        {"url": "http://127.0.0.1:10005", "state": "gone"},
        {"url": "http://127.0.0.1:10006", "health": "unhealthy"},
        {"url": "http://127.0.0.1:10007"},  # its breaker is open
        {"url": "http://127.0.0.1:10008"},  # half-open, its one trial in flight
        {"url": "http://127.0.0.1:10009", "max_concurrency": 1},  # busy
        {"url": DEAD},  # tried first, then left out as already tried
    ]
    snapshot = make_snapshot(nodes)
    snapshots.install(snapshot)
    router = proxy_app.router
    for _ in range(router.breakers.threshold):
        router.breakers.failure(7)
    for _ in range(router.breakers.threshold):  # opened a cool-down ago
        router.breakers.failure(8, now=time.time() - router.breakers.cooldown - 1)
    assert router.breakers.allows(8) and router.breakers.state(8) == HALF_OPEN
    router.breakers.acquired(8)  # its one trial in flight
    assert router.load.try_acquire(snapshot.nodes[9])
    for _ in range(2):  # round robin: one of the two requests meets the dead node first
        response = await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)
        assert response.status == 200
        record = last_record(proxy_app)
        if record["retries"]:
            break
    assert record["retries"] == 1
    first, second = record["choices"]
    assert excluded(first) == {
        "draining": (1, ["http://127.0.0.1:10002"]),
        "disabled": (1, ["http://127.0.0.1:10003"]),
        "pending": (1, ["http://127.0.0.1:10004"]),
        "gone": (1, ["http://127.0.0.1:10005"]),
        "unhealthy": (1, ["http://127.0.0.1:10006"]),
        "breaker_open": (1, ["http://127.0.0.1:10007"]),
        "breaker_trial": (1, ["http://127.0.0.1:10008"]),
        "max_concurrency": (1, ["http://127.0.0.1:10009"]),
    }
    assert (first["in_rotation"], first["available"]) == (5, 2)
    assert first["pick"] == {"node": 10, "url": DEAD}
    assert excluded(second)["tried"] == (1, [DEAD])
    assert second["pick"] is not None and second["pick"]["url"] == good.url
    dead, retried = record["attempts"]
    assert (dead["url"], dead["status"], dead["error"], dead["verdict"]) == (DEAD, 0, "engine_unreachable", False)
    assert (retried["url"], retried["retry"], retried["status"]) == (good.url, "engine_unreachable", 200)
    router.load.release(9)


async def test_a_key_refused_the_model_leaves_every_node_out_as_not_allowed(engines, proxy_app):
    engine = await engines("a")
    keys = {"rp-test-key": {"allowed_models": ["other"]}}
    snapshots.install(make_snapshot([{"url": engine.url}, {"url": DEAD, "state": "draining"}], keys=keys))
    response = await call(proxy_app, "POST", CHAT, json_body=chat(), headers={**AUTH, "x-routerpanel-explain": "1"})
    assert response.status == 403
    assert response.headers["x-routerpanel-explain"] == (
        "strategy=round_robin; pick=none; candidates=0; excluded=not_allowed:1,draining:1; retries=0"
    )
    record = last_record(proxy_app)
    assert (record["status"], record["error"]) == (403, "model_not_allowed")
    assert "may not use the model" in (record["message"] or "")
    [choice] = record["choices"]
    assert excluded(choice) == {"not_allowed": (1, [engine.url]), "draining": (1, [DEAD])}
    assert choice["pick"] is None and record["attempts"] == []
    assert engine.received == []


async def test_an_unknown_model_is_recorded_without_a_route(proxy_app):
    snapshots.install(make_snapshot([{"url": DEAD}]))
    response = await call(proxy_app, "POST", CHAT, json_body=chat("nope"), headers=AUTH)
    assert response.status == 404
    record = last_record(proxy_app)
    assert (record["model"], record["status"], record["error"], record["mode"]) == (
        "nope",
        404,
        "model_not_found",
        None,
    )


async def test_a_request_that_fails_after_retries_says_why(engines, proxy_app):
    busy = await engines("busy", mode="status:503")
    snapshots.install(make_snapshot([{"url": DEAD}, {"url": busy.url}, {"url": "http://127.0.0.1:10003"}]))
    breakers = proxy_app.router.breakers
    for _ in range(breakers.threshold):
        breakers.failure(3, now=time.time() + 3600)  # open for an hour
    response = await call(proxy_app, "POST", CHAT, json_body=chat(), headers={**AUTH, "x-routerpanel-explain": "1"})
    assert response.status == 503  # every node failed: the last engine answer is the client's
    record = last_record(proxy_app)
    assert (record["status"], record["retries"]) == (503, 1)
    reasons = [(a["url"], a["status"], a["error"], a["retry"]) for a in record["attempts"]]
    assert sorted(reasons, key=lambda r: r[0] == DEAD) in (
        [(busy.url, 503, None, None), (DEAD, 0, "engine_unreachable", "503")],
        [(busy.url, 503, None, "engine_unreachable"), (DEAD, 0, "engine_unreachable", None)],
    )
    assert all(excluded(c)["breaker_open"] == (1, ["http://127.0.0.1:10003"]) for c in record["choices"])
    assert record["node"] == {"node": 2, "url": busy.url}  # whose answer the client got, tried first or last
    summary = response.headers["x-routerpanel-explain"]
    assert summary.startswith("strategy=round_robin; pick=") and "retries=1 (" in summary
    assert "breaker_open:1" in summary and "tried:1" in summary


async def test_the_summary_header_goes_out_with_a_stream_and_only_on_request(engines, proxy_app):
    engine = await engines("a", chunks=3)
    snapshots.install(make_snapshot([{"url": engine.url}, {"url": DEAD, "state": "disabled"}]))
    plain = await call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH)
    assert "x-routerpanel-explain" not in plain.headers
    asked = await call(
        proxy_app, "POST", CHAT, json_body=chat(stream=True), headers={**AUTH, "x-routerpanel-explain": "1"}
    )
    assert asked.headers["x-routerpanel-explain"] == (
        f"strategy=round_robin; pick={engine.url}; candidates=1; excluded=disabled:1; retries=0"
    )
    record = last_record(proxy_app)
    [attempt] = record["attempts"]
    assert record["stream"] and attempt["ttft_ms"] is not None
    assert record["ttfb_ms"] == round(attempt["started_ms"] + attempt["ttft_ms"], 3)
    assert record["ttfb_ms"] <= record["total_ms"]


async def test_usage_is_read_from_a_json_answer_and_from_a_streams_usage_chunk(proxy_app):
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "prompt_tokens_details": None}
    body = {"id": "x", "choices": [{"message": {"content": 'usage: "usage"'}}], "usage": usage}
    explanation = Explanation("r", None, "m", CHAT, False, 0.0, False)
    explainer = Explainer()
    explainer.finish(explanation, Outcome(status=200, usage=json.dumps(body).encode()))
    record = live.decode(live.encode(explanation.wire()))
    assert record is not None and record["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    chunk = b'data: {"choices":[],"usage":{"prompt_tokens":5,"total_tokens":9,"completion_tokens":4}}\n\n'
    streamed = Explanation("s", None, "m", CHAT, True, 0.0, False)
    explainer.finish(streamed, Outcome(status=200, usage=chunk + b"data: [DONE]\n\n"))
    assert live.decode(live.encode(streamed.wire()))["usage"]["completion_tokens"] == 4  # type: ignore[index]
    nothing = Explanation("n", None, "m", CHAT, True, 0.0, False)
    explainer.finish(nothing, Outcome(status=200, usage=b"data: [DONE]\n\n"))
    assert live.decode(live.encode(nothing.wire()))["usage"] is None  # type: ignore[index]


async def usage_of_stream(proxy_app, engine, *writes: bytes):
    """The usage recorded for a streamed request whose engine answers with ``writes``, one
    ``write`` each, then the end of the body."""
    original = engine._stream

    async def scripted(request, body):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in writes:
            await response.write(piece)
        await response.write_eof()
        return response

    engine._stream = scripted
    try:
        response = await call(proxy_app, "POST", CHAT, json_body=chat(stream=True), headers=AUTH)
    finally:
        engine._stream = original
    assert response.status == 200
    return last_record(proxy_app)["usage"]


async def test_a_stream_keeps_its_usage_chunk_for_the_explanation(engines, proxy_app):
    engine = await engines("a", chunks=2)
    snapshots.install(make_snapshot([{"url": engine.url}]))
    usage = await usage_of_stream(  # the usage chunk, then [DONE] in a write of its own
        proxy_app,
        engine,
        b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n',
        b"data: [DONE]\n\n",
    )
    assert usage == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": None}


async def test_a_stream_read_in_one_piece_keeps_its_usage_and_one_without_usage_records_none(engines, proxy_app):
    """A fast engine writes its whole stream at once: the usage chunk is found at the end of one
    long read (only the end is searched), and a long stream without one records no usage."""
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url}]))
    running = b"".join(
        b'data: {"choices":[{"index":0,"delta":{"content":" word%d"},"finish_reason":null}]}\n\n' % i
        for i in range(200)
    )
    assert len(running) > 4 * proxy_relay.USAGE_WITHIN
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":200,"total_tokens":203}}\n\n'
    assert await usage_of_stream(proxy_app, engine, running + usage + b"data: [DONE]\n\n") == {
        "prompt_tokens": 3,
        "completion_tokens": 200,
        "total_tokens": 203,
    }
    assert await usage_of_stream(proxy_app, engine, running + b"data: [DONE]\n\n") is None


async def test_a_route_of_a_thousand_nodes_lists_a_few_candidates_and_counts_the_rest(engines, proxy_app):
    engine = await engines("a")
    nodes = [{"url": engine.url}]
    nodes += [{"url": f"http://127.0.0.1:{20000 + i}", "max_concurrency": 1} for i in range(600)]
    nodes += [{"url": f"http://127.0.0.1:{30000 + i}", "state": "draining"} for i in range(400)]
    snapshot = make_snapshot(nodes, default_policy=PolicyView(strategy="least_requests"))
    snapshots.install(snapshot)
    for node_id in range(2, 602):
        assert proxy_app.router.load.try_acquire(snapshot.nodes[node_id])
    response = await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)
    assert response.status == 200
    [choice] = last_record(proxy_app)["choices"]
    assert (choice["in_rotation"], choice["available"]) == (601, 1)
    assert len(choice["candidates"]) == 1
    by_reason = {e["reason"]: e for e in choice["excluded"]}
    assert by_reason["max_concurrency"]["count"] == 600 and by_reason["draining"]["count"] == 400
    assert all(len(e["nodes"]) == live.NAMED_PER_REASON for e in choice["excluded"])
    for node_id in range(2, 602):
        proxy_app.router.load.release(node_id)


@pytest.fixture(params=["quiet", "busy"])
def loop_state(request, monkeypatch) -> str:
    """A quiet loop (a request written at once: its pick recorded after, ``Explanation.settle``) or
    a busy one (the pick recorded at once)."""
    monkeypatch.setattr(proxy_hybrid, "quiet", lambda: request.param == "quiet")
    return request.param


async def test_a_picks_figures_are_those_the_router_read_before_it_took_the_slot(engines, proxy_app, loop_state):
    # The request's own slot is not among the pick's requests in flight, and a pick that its own
    # slot brought to its limit is not among the nodes left out.
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url, "max_concurrency": 1}]))
    response = await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)
    assert response.status == 200
    [choice] = last_record(proxy_app)["choices"]
    assert (choice["in_rotation"], choice["available"], choice["excluded"]) == (1, 1, [])
    assert [c["inflight"] for c in choice["candidates"]] == [0]


async def test_a_pick_is_recorded_before_other_requests_run_while_its_connection_opens(engines, proxy_app, loop_state):
    # No connection is open yet: each request waits for its own, and the other request picks a node
    # meanwhile. The first pick still records the figures it was made on (nothing in flight), not
    # the second request's slot taken since.
    a, b = await engines("a"), await engines("b")
    policy = PolicyView(strategy="least_requests")
    snapshots.install(make_snapshot([{"url": a.url}, {"url": b.url}], default_policy=policy))
    responses = await asyncio.gather(*(call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH) for _ in "ab"))
    assert [r.status for r in responses] == [200, 200]
    records = [live.decode(packed, "1-0") for packed in proxy_app.explainer.buffer[-2:]]
    seen = sorted(sum(c["inflight"] for c in record["choices"][0]["candidates"]) for record in records if record)
    assert seen == [0, 1]  # the first pick saw nothing in flight, the second the first's request


async def test_candidates_list_the_pick_first_and_at_most_a_few(engines, proxy_app):
    many = [await engines(f"e{i}") for i in range(5)]
    snapshots.install(make_snapshot([{"url": e.url} for e in many]))
    await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)
    [choice] = last_record(proxy_app)["choices"]
    assert len(choice["candidates"]) == live.LISTED_CANDIDATES
    assert choice["candidates"][0]["node"] == choice["pick"]["node"]  # type: ignore[index]
    assert len({c["node"] for c in choice["candidates"]}) == live.LISTED_CANDIDATES


async def test_the_prefix_cache_strategy_records_the_match_it_routed_by(engines, proxy_app):
    a, b = await engines("a"), await engines("b")
    policy = PolicyView(strategy="prefix_cache", prefix_min_match=8)
    snapshots.install(make_snapshot([{"url": a.url}, {"url": b.url}], default_policy=policy))
    prompt = "a long shared system prompt " * 20
    body = {"model": "m", "prompt": prompt, "max_tokens": 1}
    await call(proxy_app, "POST", "/v1/completions", json_body=body, headers=AUTH)
    await call(proxy_app, "POST", "/v1/completions", json_body=body, headers=AUTH)
    [choice] = last_record(proxy_app)["choices"]
    pick = choice["candidates"][0]
    assert pick["prefix_match"] is not None and pick["prefix_match"] >= 8 + 128
    assert all(c["prefix_match"] is None for c in choice["candidates"][1:])


async def test_a_pd_request_records_both_legs_their_timings_and_the_pair(fake_pd, proxy_app):
    _, prefills, decodes = await fake_pd(decodes=2)
    policy = PolicyView(serving_mode="pd", retry_budget=2, first_token_timeout=5.0, total_timeout=10.0)
    snapshots.install(make_snapshot(pd_nodes(prefills, [DEAD, *decodes]), default_policy=policy))
    record = None
    for _ in range(3):  # round robin: one of three requests meets the dead decode node first
        response = await call(proxy_app, "POST", CHAT, json_body={**chat(), "max_tokens": 4}, headers=AUTH)
        assert response.status == 200, response.body
        record = last_record(proxy_app)
        if record["retries"]:
            break
    await settled(proxy_app)
    assert record is not None and record["mode"] == "pd" and record["retries"] == 1
    roles = [(c["role"], c["pick"]["url"] if c["pick"] else None) for c in record["choices"]]
    assert roles[:2] == [("prefill", prefills[0]), ("decode", DEAD)]
    assert roles[2][0] == "decode" and roles[2][1] in decodes
    legs = [(a["role"], a["url"], a["status"], a["retry"]) for a in record["attempts"]]
    assert legs == [
        ("prefill", prefills[0], 200, None),
        ("decode", DEAD, 0, None),
        ("decode", roles[2][1], 200, "decode_unreachable"),
    ]
    prefill_leg, _, decode_leg = record["attempts"]
    assert decode_leg["started_ms"] >= prefill_leg["started_ms"] + prefill_leg["duration_ms"] - 0.001
    assert record["pair"] == {
        "prefill": {"node": 1, "url": prefills[0]},
        "decode": {"node": decode_leg["node"], "url": roles[2][1]},
    }
    assert record["usage"] is not None and record["usage"]["prompt_tokens"] == 4  # the prefill's, merged


async def test_with_explanations_off_nothing_is_kept_but_the_summary_still_answers(engines, proxy_app):
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url}]))
    proxy_app.explainer.enabled = False
    proxy_app.explainer.buffer.clear()
    await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)
    asked = await call(proxy_app, "POST", CHAT, json_body=chat(), headers={**AUTH, "x-routerpanel-explain": "1"})
    assert asked.headers["x-routerpanel-explain"].startswith("strategy=round_robin; pick=")
    assert proxy_app.explainer.buffer == []


async def test_waiting_records_are_bytes_and_keep_no_request_objects_alive(engines, proxy_app):
    # The buffer holds packed records: nothing of a finished request (its explanation, the route
    # and key it points at) waits for the flush where the garbage collector has to walk it.
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url}]))
    proxy_app.explainer.buffer.clear()
    proxy_app.explainer.ids.clear()
    for _ in range(3):
        assert (await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)).status == 200
    assert len(proxy_app.explainer.buffer) == 3 and all(isinstance(r, bytes) for r in proxy_app.explainer.buffer)
    assert not [o for o in gc.get_objects() if type(o) is Explanation]
    assert last_record(proxy_app)["id"] == proxy_app.explainer.ids[-1]


async def test_a_record_that_cannot_be_packed_is_dropped_and_counted_and_the_request_answers(
    engines, proxy_app, monkeypatch
):
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url}]))
    proxy_app.explainer.buffer.clear()
    dropped = proxy_app.explainer.dropped

    def broken(self: Explanation) -> None:
        raise ValueError("unpackable")

    monkeypatch.setattr(Explanation, "wire", broken)
    assert (await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)).status == 200
    assert proxy_app.explainer.buffer == [] and proxy_app.explainer.dropped == dropped + 1


async def test_a_full_buffer_drops_and_counts_instead_of_growing(engines, proxy_app):
    engine = await engines("a")
    snapshots.install(make_snapshot([{"url": engine.url}]))
    proxy_app.explainer.buffer.clear()
    proxy_app.explainer.buffer_size = 2
    for _ in range(5):
        assert (await call(proxy_app, "POST", CHAT, json_body=chat(), headers=AUTH)).status == 200
    assert len(proxy_app.explainer.buffer) == 2
    assert proxy_app.explainer.dropped == 3


def test_the_summary_of_a_pd_pair_names_both_legs() -> None:
    snapshot = make_snapshot(
        pd_nodes(["http://p:1"], ["http://d:1"]), default_policy=PolicyView(serving_mode="pd", strategy="round_robin")
    )
    route = snapshot.routes["m"]
    explanation = Explanation("r", None, "m", CHAT, False, 0.0, True)
    explanation.route = route

    class Load:
        def inflight(self, node_id: int) -> int:
            return 2

        def latency(self, node_id: int) -> float:
            return 0.5

    class FakeRouter:
        load = Load()

    for role, targets in (("prefill", route.prefill), ("decode", route.decode)):
        explanation.chose(FakeRouter(), role, len(targets), None, (targets[0],))  # type: ignore[arg-type]
    assert explanation.summary() == (
        b"strategy=round_robin; pick=prefill http://p:1, decode http://d:1; candidates=2; excluded=none; retries=0"
    )
    wire = live.decode(live.encode(explanation.wire()))
    assert wire is not None
    assert [c["candidates"][0]["latency_ms"] for c in wire["choices"]] == [500.0, 500.0]
