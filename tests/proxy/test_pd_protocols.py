"""PD building blocks as pure functions: serving mode, what each engine's legs are sent, usage
merging, the one-chunk stream of an EOS-at-prefill answer."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from proxy.errors import ProxyError
from proxy.pd.core import (
    Leg,
    LegAnswer,
    completion_chunk,
    decode_failed,
    merge_usage,
    merge_usage_events,
    wants_pd,
)
from proxy.pd.engines import Lmdeploy, NanoDeploy, Sglang, Vllm
from proxy.snapshot import NodeView, PolicyView, Target

from .conftest import make_snapshot


def route(mode: str, roles: list[str], healthy: bool = True):
    nodes = [
        {"url": f"http://n{i}:8000", "models": ["m"], "role": role, "health": "healthy" if healthy else "unhealthy"}
        for i, role in enumerate(roles)
    ]
    return make_snapshot(nodes, default_policy=PolicyView(serving_mode=mode)).routes["m"]


@pytest.mark.parametrize(
    ("mode", "roles", "expected"),
    [
        ("auto", ["prefill", "decode"], True),
        ("auto", ["hybrid", "prefill", "decode"], True),
        ("auto", ["hybrid"], False),
        ("auto", ["hybrid", "prefill"], False),
        ("auto", ["prefill"], True),  # no hybrid node: PD, so the 503 names the missing decode role
        ("pd", ["hybrid"], True),
        ("hybrid", ["hybrid", "prefill", "decode"], False),
    ],
)
def test_serving_mode_decides_between_pd_and_hybrid(mode, roles, expected):
    assert wants_pd(route(mode, roles)) is expected


def fake_pd(payload: dict, *, path: str = "/v1/chat/completions", request_id: str = "rid"):
    """The parts of a ``PdRequest`` that protocol steps read."""

    def payload_for(leg, *, drop=(), **changes):
        out = {k: v for k, v in payload.items() if k not in drop}
        out["model"] = leg.target.served_name
        out.update(changes)
        return out

    request = SimpleNamespace(path=path, payload=payload, request_id=request_id, model=payload.get("model"))
    return SimpleNamespace(request=request, payload_for=payload_for, decode=None, upstream_request_id=request_id)


def leg(url: str, role: str, engine: str, **node) -> Leg:
    view = NodeView(
        id=hash(url) % 1000, url=url, engine_type=engine, role=role, state="active", health="healthy", **node
    )
    return Leg(role, Target(view, "served"))


def test_nanodeploy_prefill_keeps_the_budget_and_the_decode_gets_the_migration():
    pd = fake_pd({"model": "alias", "messages": [], "max_tokens": 50, "stream": True, "stream_options": {}})
    protocol = NanoDeploy()
    path, body, headers = protocol.prefill_request(pd, leg("http://p:1", "prefill", "nanodeploy"))
    assert path == "/v1/chat/completions"
    assert headers == {"Content-Type": "application/json", "X-Request-Id": "rid"}
    assert body == {
        "model": "served",
        "messages": [],
        "max_tokens": 50,
        "stream": False,
        "kv_transfer_params": {"do_remote_decode": True},
    }
    params = {"migration": "abc", "seq_id": 7, "first_token": 3, "other": 1}
    answer = LegAnswer(
        leg("http://p:1", "prefill", "nanodeploy"), 200, b"", "application/json", {"kv_transfer_params": params}
    )
    handoff = protocol.handoff(pd, answer)
    assert handoff == {"migration": "abc", "seq_id": 7, "first_token": 3}
    assert protocol.kv_key(answer) == 7
    _, decoded, _ = protocol.decode_request(pd, leg("http://d:1", "decode", "nanodeploy"), handoff)
    assert decoded["stream"] is True and decoded["kv_transfer_params"] == handoff


def test_nanodeploy_eos_at_prefill_has_no_handoff_and_nothing_to_free():
    pd = fake_pd({"model": "m", "messages": []})
    answer = LegAnswer(leg("http://p:1", "prefill", "nanodeploy"), 200, b"", "application/json", {"choices": [{}]})
    assert NanoDeploy().handoff(pd, answer) is None
    assert NanoDeploy().kv_key(answer) is None


def test_a_nanodeploy_prefill_answer_without_migration_or_choices_is_a_502():
    pd = fake_pd({"model": "m", "messages": []})
    answer = LegAnswer(leg("http://p:1", "prefill", "nanodeploy"), 200, b"{}", "application/json", {})
    with pytest.raises(ProxyError) as caught:
        NanoDeploy().handoff(pd, answer)
    assert caught.value.status == 502


def test_vllm_prefill_is_clamped_and_named_after_both_nodes():
    pd = fake_pd({"model": "m", "prompt": "x", "max_completion_tokens": 9, "stream": True, "stream_options": {}})
    pd.decode = leg("http://10.0.0.2:8200", "decode", "vllm")
    prefill = leg("http://10.0.0.1:8100", "prefill", "vllm", kv_connector_address="10.9.9.9:14579")
    _, body, headers = Vllm().prefill_request(pd, prefill)
    assert body["stream"] is False and body["max_tokens"] == 1 and body["min_tokens"] == 1
    assert body["max_completion_tokens"] == 1 and "stream_options" not in body
    assert body["kv_transfer_params"]["do_remote_decode"] is True
    assert headers["X-Request-Id"].startswith("___prefill_addr_10.9.9.9:14579___decode_addr_10.0.0.2:8200_")
    ranked = Leg("decode", pd.decode.target, rank=1)
    assert ranked.label == "http://10.0.0.2:8200@1"
    assert ranked.headers("r")["X-data-parallel-rank"] == "1"


def test_lmdeploy_builds_the_migration_request_from_the_prefill_answer():
    pd = fake_pd({"model": "m", "messages": [], "max_tokens": 30})
    prefill = leg("http://p:1", "prefill", "lmdeploy")
    _, body, _ = Lmdeploy().prefill_request(pd, prefill)
    assert body["max_tokens"] == 1 and body["with_cache"] is True and body["preserve_cache"] is True
    data = {"id": "17", "cache_block_ids": [4, 5], "remote_token_ids": [1, 2, 99]}
    answer = LegAnswer(prefill, 200, b"", "application/json", data)
    assert Lmdeploy().handoff(pd, answer) == {
        "protocol": "RDMA",
        "remote_engine_id": "http://p:1",
        "remote_session_id": 17,
        "remote_block_ids": [4, 5],
        "remote_token_id": 99,
    }
    assert Lmdeploy().kv_key(answer) == 17


@pytest.mark.parametrize(
    ("payload", "rooms"),
    [
        ({"messages": []}, 1),
        ({"prompt": "one"}, 1),
        ({"prompt": [1, 2, 3]}, 1),  # token ids: one prompt
        ({"prompt": ["a", "b", "c"]}, 3),
        ({"prompt": "one", "n": 2}, 2),
        ({"prompt": ["a", "b"], "n": 3}, 6),
    ],
)
def test_sglang_gets_one_room_per_prompt_and_copy(payload, rooms):
    random.seed(1)
    pd = fake_pd({"model": "m", **payload})
    fields = Sglang().bootstrap(pd, leg("http://[::1]:30000", "prefill", "sglang"))
    assert fields["bootstrap_host"] == "[::1]" and fields["bootstrap_port"] == 8998
    room = fields["bootstrap_room"]
    if rooms == 1:
        assert isinstance(room, int) and 0 <= room < 2**63
    else:
        assert len(room) == rooms and len(set(room)) == rooms


def test_sglang_uses_the_nodes_bootstrap_port():
    pd = fake_pd({"model": "m", "messages": []})
    fields = Sglang().bootstrap(pd, leg("http://10.0.0.1:30000", "prefill", "sglang", bootstrap_port=9100))
    assert fields["bootstrap_host"] == "10.0.0.1" and fields["bootstrap_port"] == 9100


def test_usage_takes_prompt_tokens_from_the_prefill():
    body = json.dumps({"id": "x", "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}).encode()
    merged = json.loads(merge_usage(body, 11))
    assert merged["usage"] == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    assert merge_usage(body, None) is body
    assert merge_usage(b"not json", 4) == b"not json"


def test_usage_in_a_stream_is_merged_and_other_events_pass_untouched():
    chunk = (
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n'
        b"data: [DONE]\n\n"
    )
    merged = merge_usage_events(chunk, 7)
    events = merged.split(b"\n\n")
    assert events[0] == b'data: {"choices":[{"delta":{"content":"hi"}}]}'
    assert json.loads(events[1][6:])["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert events[2] == b"data: [DONE]"
    plain = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    assert merge_usage_events(plain, 7) is plain


def test_an_eos_answer_becomes_one_chat_or_text_chunk():
    chat = SimpleNamespace(path="/v1/chat/completions", model="m", payload={"stream_options": {"include_usage": True}})
    data = {
        "id": "c1",
        "created": 5,
        "model": "served",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " Hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }
    chunk = completion_chunk(data, chat)
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": " Hi"}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert chunk["usage"]["total_tokens"] == 3
    text = SimpleNamespace(path="/v1/completions", model="m", payload={})
    data = {"id": "c2", "choices": [{"index": 0, "text": " Hi", "finish_reason": "stop"}], "usage": {}}
    chunk = completion_chunk(data, text)
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["text"] == " Hi" and "usage" not in chunk


def test_a_decode_error_is_a_502_quoting_the_engine():
    error = decode_failed(leg("http://d:1", "decode", "nanodeploy"), 400, b'{"error": {"message": "bad migration"}}')
    assert error.status == 502 and error.code == "decode_failed"
    assert "bad migration" in error.message and "400" in error.message
