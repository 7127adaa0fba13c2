"""PD building blocks as pure functions: serving mode, what each engine's legs are sent, usage
merging, the one-chunk stream of an EOS-at-prefill answer."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from proxy.errors import ProxyError
from proxy.pd import lmdeploy as lmdeploy_wire
from proxy.pd import metrics as pd_metrics
from proxy.pd.core import Leg, LegAnswer, PdRequest, wants_pd
from proxy.pd.engines import LmdeployPd, NanoDeployPd, SglangPd, VllmPd
from proxy.pd.legs import completion_chunk, decode_failed, run_decode
from proxy.pd.usage import merge_usage, merge_usage_events
from proxy.request import ProxyRequest
from proxy.snapshot import NodeView, PolicyView, Target
from proxy.transport import RequestHeaders

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

    def body_for(leg, *, drop=(), **changes):  # the real encoding, over the client's bytes
        return PdRequest.body_for(pd, leg, drop=drop, **changes)

    def body_with(leg, changes):
        return PdRequest.body_with(pd, leg, changes)

    body = json.dumps(payload).encode()
    request = ProxyRequest(path, payload.get("model"), None, payload, body, False, request_id, RequestHeaders())  # type: ignore[arg-type]
    pd = SimpleNamespace(request=request, payload_for=payload_for, body_for=body_for, body_with=body_with, decode=None)
    return pd


def sent(body: bytes | dict) -> dict:
    """A leg's body as the engine reads it."""
    return json.loads(body) if isinstance(body, bytes) else body


def leg(url: str, role: str, engine: str, **node) -> Leg:
    view = NodeView(
        id=hash(url) % 1000, url=url, engine_type=engine, role=role, state="active", health="healthy", **node
    )
    return Leg(role, Target(view, "served"))


def test_nanodeploy_prefill_keeps_the_budget_and_the_decode_gets_the_migration():
    pd = fake_pd({"model": "alias", "messages": [], "max_tokens": 50, "stream": True, "stream_options": {}})
    protocol = NanoDeployPd()
    path, body, headers = protocol.prefill_request(pd, leg("http://p:1", "prefill", "nanodeploy"))
    assert path == "/v1/chat/completions"
    assert headers == {"Content-Type": "application/json", "X-Request-Id": "rid"}
    assert sent(body) == {
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
    assert sent(decoded)["stream"] is True and sent(decoded)["kv_transfer_params"] == handoff


def test_nanodeploy_eos_at_prefill_has_no_handoff_and_nothing_to_free():
    pd = fake_pd({"model": "m", "messages": []})
    answer = LegAnswer(leg("http://p:1", "prefill", "nanodeploy"), 200, b"", "application/json", {"choices": [{}]})
    assert NanoDeployPd().handoff(pd, answer) is None
    assert NanoDeployPd().kv_key(answer) is None


def test_a_nanodeploy_prefill_answer_without_migration_or_choices_is_a_502():
    pd = fake_pd({"model": "m", "messages": []})
    answer = LegAnswer(leg("http://p:1", "prefill", "nanodeploy"), 200, b"{}", "application/json", {})
    with pytest.raises(ProxyError) as caught:
        NanoDeployPd().handoff(pd, answer)
    assert caught.value.status == 502


def test_vllm_prefill_is_clamped_without_min_tokens_under_the_requests_own_id():
    client = {
        "model": "m",
        "prompt": "x",
        "max_completion_tokens": 9,
        "min_tokens": 4,
        "min_completion_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    pd = fake_pd(client, path="/v1/completions", request_id="rid-1")
    pd.decode = leg("http://10.0.0.2:8200", "decode", "vllm")
    prefill = leg("http://10.0.0.1:8100", "prefill", "vllm", kv_connector_address="10.9.9.9:14579")
    path, body, headers = VllmPd().prefill_request(pd, prefill)
    # As vLLM's own proxies build it: min_tokens above max_tokens=1 is a 400 in vLLM, so both are dropped.
    assert (path, body) == (
        "/v1/completions",
        {
            "model": "served",
            "prompt": "x",
            "max_tokens": 1,
            "max_completion_tokens": 1,
            "stream": False,
            "kv_transfer_params": {
                "do_remote_decode": True,
                "do_remote_prefill": False,
                "remote_engine_id": None,
                "remote_block_ids": None,
                "remote_host": None,
                "remote_port": None,
            },
        },
    )
    # One X-Request-Id on both legs (no P2P-NCCL address encoding: that connector is gone from vLLM).
    assert headers == {"Content-Type": "application/json", "X-Request-Id": "rid-1"}
    _, decoded, decode_headers = VllmPd().decode_request(pd, pd.decode, {"remote_request_id": "r"})
    assert decode_headers["X-Request-Id"] == "rid-1"
    decoded = sent(decoded)
    assert decoded["min_tokens"] == 4 and decoded["max_completion_tokens"] == 9 and decoded["stream"] is True
    ranked = Leg("decode", pd.decode.target, rank=1)
    assert ranked.label == "http://10.0.0.2:8200@1"
    assert ranked.headers("r")["X-data-parallel-rank"] == "1"


def test_vllm_prefill_without_min_tokens_sends_no_max_completion_tokens_either():
    pd = fake_pd({"model": "m", "messages": [], "max_tokens": 30})
    _, body, _ = VllmPd().prefill_request(pd, leg("http://p:1", "prefill", "vllm"))
    assert body["max_tokens"] == 1 and "max_completion_tokens" not in body and "min_tokens" not in body


def vllm_prefill_answer(data: dict | None) -> LegAnswer:
    return LegAnswer(leg("http://p:1", "prefill", "vllm"), 200, b"", "application/json", data)


def test_vllm_nixl_params_go_to_the_decode_unchanged():
    params = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [[3, 4, 5]],
        "remote_engine_id": "e-1",
        "remote_request_id": "cmpl-rid-1-0-ab12cd34",
        "remote_host": "10.0.0.1",
        "remote_port": 5600,
        "tp_size": 1,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": 331,
        "remote_blocks_expiry_time": None,
        "transfer_mode": "pull",
    }
    pd = fake_pd({"model": "m", "messages": [], "max_tokens": 30})
    handoff = VllmPd().handoff(pd, vllm_prefill_answer({"choices": [{}], "kv_transfer_params": params}))
    assert handoff == params
    _, body, _ = VllmPd().decode_request(pd, leg("http://d:1", "decode", "vllm"), handoff)
    assert sent(body) == {"model": "served", "messages": [], "max_tokens": 30, "kv_transfer_params": params}


@pytest.mark.parametrize(
    "data", [{"choices": [{}], "kv_transfer_params": None}, {"choices": [{}]}], ids=["null", "absent"]
)
def test_a_vllm_prefill_without_kv_transfer_params_is_followed_by_a_plain_decode(data):
    # The ExampleConnector answers "kv_transfer_params": null; vLLM's proxies then send the decode as is.
    pd = fake_pd({"model": "m", "messages": [], "max_tokens": 30, "stream": True})
    handoff = VllmPd().handoff(pd, vllm_prefill_answer(data))
    assert handoff == {}
    _, body, _ = VllmPd().decode_request(pd, leg("http://d:1", "decode", "vllm"), handoff)
    assert sent(body) == {"model": "served", "messages": [], "max_tokens": 30, "stream": True}


@pytest.mark.parametrize("data", [None, {"kv_transfer_params": "x"}], ids=["not-json", "not-an-object"])
def test_an_unusable_vllm_prefill_answer_is_a_502(data):
    with pytest.raises(ProxyError) as caught:
        VllmPd().handoff(fake_pd({"model": "m", "messages": []}), vllm_prefill_answer(data))
    assert (caught.value.status, caught.value.code) == (502, "prefill_failed")


def test_lmdeploy_builds_the_migration_request_from_the_prefill_answer():
    pd = fake_pd({"model": "m", "messages": [], "max_tokens": 30, "stream": True, "stream_options": {}})
    prefill = leg("http://p:1", "prefill", "lmdeploy")
    _, body, _ = LmdeployPd().prefill_request(pd, prefill)
    assert body == {
        "model": "served",
        "messages": [],
        "max_tokens": 1,
        "max_completion_tokens": 1,
        "stream": False,
        "with_cache": True,
        "preserve_cache": True,
    }
    data = {"id": "17", "object": "chat.completion", "cache_block_ids": [4, 5], "remote_token_ids": [99]}
    answer = LegAnswer(prefill, 200, b"", "application/json", data)
    handoff = LmdeployPd().handoff(pd, answer)
    # LMDeploy's enums are integers on the wire: MigrationProtocol.RDMA is 2, never "RDMA".
    assert handoff == {
        "protocol": 2,
        "remote_engine_id": "http://p:1",
        "remote_session_id": 17,
        "remote_block_ids": [4, 5],
        "remote_token_id": 99,
        "is_dummy_prefill": False,
    }
    assert LmdeployPd().kv_key(answer) == 17
    _, decoded, _ = LmdeployPd().decode_request(pd, leg("http://d:1", "decode", "lmdeploy"), handoff)
    assert decoded["migration_request"] == handoff and decoded["stream"] is True and "with_cache" not in decoded


def test_lmdeploy_caps_a_completions_prefill_at_one_token_even_with_max_completion_tokens():
    # LMDeploy prefers max_completion_tokens over max_tokens, on completions too; its own proxy
    # leaves a client's max_completion_tokens there, so the prefill would generate the whole answer.
    pd = fake_pd({"model": "m", "prompt": "x", "max_completion_tokens": 50, "migration_request": {"x": 1}})
    _, body, _ = LmdeployPd().prefill_request(pd, leg("http://p:1", "prefill", "lmdeploy"))
    assert body["max_completion_tokens"] == 1 and body["max_tokens"] == 1 and "migration_request" not in body


@pytest.mark.parametrize(
    ("data", "session"),
    [
        ({"id": "chatcmpl-8fJx2", "object": "chat.completion"}, -1),  # LMDeploy >= 0.15: no session in the id
        ({"id": "12", "object": "chat.completion"}, 12),  # LMDeploy <= 0.14: the chat id is the session id
        ({"id": "-1", "object": "text_completion"}, -1),  # completions: the client's session_id, never ours
        ({"id": "7", "object": "text_completion"}, -1),
        ({"id": "chatcmpl-1", "object": "chat.completion", "cache_session_id": 31}, 31),  # an explicit field
        ({"id": None, "object": "chat.completion"}, -1),
        ({"object": "chat.completion", "cache_session_id": "31"}, -1),
    ],
)
def test_lmdeploy_takes_the_session_only_from_a_field_that_names_it(data, session):
    prefill = leg("http://p:1", "prefill", "lmdeploy")
    answer = LegAnswer(prefill, 200, b"", "application/json", {**data, "cache_block_ids": [1], "remote_token_ids": [5]})
    assert LmdeployPd().kv_key(answer) == session
    assert LmdeployPd().handoff(fake_pd({"model": "m"}), answer)["remote_session_id"] == session


class RecordingPd(SimpleNamespace):
    """A ``PdRequest`` stand-in that records the KV releases sent and answers them 200."""

    async def post_json(self, leg, path, body, headers, timeout):
        self.sent.append((leg.url + path, body))
        return LegAnswer(leg, 200, b'{"status":"SUCCESS"}', "application/json", {"status": "SUCCESS"})


@pytest.mark.parametrize(
    ("session", "decode_completed", "sent"),
    [
        (5, False, [("http://p:1/distserve/free_cache", {"remote_engine_id": "http://p:1", "remote_session_id": 5})]),
        (5, True, []),  # the decode engine freed the session itself after reading the blocks
        (-1, False, []),  # nobody can name that session: nothing to send (counted as unreleasable)
    ],
)
async def test_lmdeploy_frees_with_free_cache_only_a_named_session_the_decode_did_not_take(
    session, decode_completed, sent
):
    pd = RecordingPd(sent=[], decode_completed=decode_completed, prefill_timeout=5.0)
    before = pd_metrics.UNRELEASABLE._value.get()
    await LmdeployPd().free(pd, leg("http://p:1", "prefill", "lmdeploy"), session)
    assert pd.sent == sent
    assert pd_metrics.UNRELEASABLE._value.get() == before + (session == -1)


def test_lmdeploy_refuses_chat_with_n_above_one_before_any_node_is_picked():
    with pytest.raises(ProxyError) as caught:
        LmdeployPd().validate(fake_pd({"model": "m", "messages": [], "n": 2}))
    assert caught.value.status == 400
    LmdeployPd().validate(fake_pd({"model": "m", "messages": [], "n": 1}))


def test_a_prefill_answer_without_cache_blocks_holds_nothing_and_cannot_be_migrated():
    prefill = leg("http://p:1", "prefill", "lmdeploy")
    answer = LegAnswer(prefill, 200, b"", "application/json", {"id": "chatcmpl-1", "object": "chat.completion"})
    assert LmdeployPd().kv_key(answer) is None
    with pytest.raises(ProxyError) as caught:
        LmdeployPd().handoff(fake_pd({"model": "m"}), answer)
    assert caught.value.code == "prefill_failed"


def test_lmdeploy_engine_info_is_a_json_string_of_json_parsed_twice():
    config = {
        "tp_size": 1,
        "ep_size": 1,
        "dp_size": 1,
        "pp_size": None,
        "dp_rank": 0,
        "block_size": 64,
        "num_cpu_blocks": 0,
        "num_gpu_blocks": 512,
    }
    assert lmdeploy_wire.parse_engine_info(json.dumps(json.dumps(config)).encode()) == config
    with pytest.raises(lmdeploy_wire.WireError):
        lmdeploy_wire.parse_engine_info(json.dumps(json.dumps({**config, "block_size": "64"})).encode())
    init = lmdeploy_wire.init_request("http://p:1", config, "http://d:1", config)
    assert init["protocol"] == 2 and init["rdma_config"] == {"with_gdr": True, "link_type": 2}
    assert (init["local_engine_id"], init["remote_engine_id"]) == ("http://p:1", "http://d:1")
    peer = lmdeploy_wire.parse_init_response(
        {
            "status": 1,
            "engine_endpoint_info": {"zmq_address": "tcp://d:5555"},
            "kvtransfer_endpoint_info": [{"protocol": 2, "endpoint_info": "{}", "cache_pools": None}],
        }
    )
    assert lmdeploy_wire.connect_request("http://d:1", peer) == {
        "protocol": 2,
        "remote_engine_id": "http://d:1",
        "remote_engine_endpoint_info": {"zmq_address": "tcp://d:5555"},
        "remote_kvtransfer_endpoint_info": [{"protocol": 2, "endpoint_info": "{}", "cache_pools": None}],
    }
    with pytest.raises(lmdeploy_wire.WireError):
        lmdeploy_wire.parse_init_response({"status": 2, "engine_endpoint_info": {}, "kvtransfer_endpoint_info": []})


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
    fields = SglangPd().bootstrap(pd, leg("http://[::1]:30000", "prefill", "sglang"))
    assert fields["bootstrap_host"] == "[::1]" and fields["bootstrap_port"] == 8998
    room = fields["bootstrap_room"]
    if rooms == 1:
        assert isinstance(room, int) and 0 <= room < 2**63
    else:
        assert len(room) == rooms and len(set(room)) == rooms


def test_sglang_uses_the_nodes_bootstrap_port():
    pd = fake_pd({"model": "m", "messages": []})
    fields = SglangPd().bootstrap(pd, leg("http://10.0.0.1:30000", "prefill", "sglang", bootstrap_port=9100))
    assert fields["bootstrap_host"] == "10.0.0.1" and fields["bootstrap_port"] == 9100


def test_sglang_backs_off_between_pairs_like_its_gateway():
    protocol = SglangPd()
    for retry, base in ((0, 0.05), (1, 0.075), (3, 0.05 * 1.5**3), (40, 30.0)):
        delays = [protocol.backoff(retry) for _ in range(200)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
        assert max(delays) - min(delays) > base * 0.1  # jittered


@pytest.mark.parametrize(
    ("code", "status", "reason"),
    [
        ("decode_unreachable", 0, "connect"),
        ("decode_failed", 0, "transport"),
        ("decode_failed", 503, "503"),
        ("decode_failed", 500, "500"),
        ("decode_failed", 408, "408"),
        ("decode_failed", 429, "429"),
        ("decode_failed", 400, None),
        ("decode_failed", 404, None),
        ("decode_timeout", 0, None),
    ],
)
def test_sglang_retries_a_pair_on_the_gateways_statuses_and_on_no_answer(code, status, reason):
    assert SglangPd().retry_reason_decode(ProxyError(502, "x", code), status) == reason


def test_the_frees_metric_reports_only_what_engines_can_say():
    # DLEngine echoes the ids it was given and LMDeploy answers SUCCESS whatever it held, so a
    # "not held" result cannot be observed.
    help_text = pd_metrics.FREES.documentation
    assert "not_held" not in help_text and "echo" in help_text


def test_usage_takes_prompt_tokens_from_the_prefill():
    body = json.dumps({"id": "x", "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}).encode()
    merged = json.loads(merge_usage(body, 11))
    assert merged["usage"] == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    assert merge_usage(body, None) is body
    assert merge_usage(b"not json", 4) == b"not json"


@pytest.mark.parametrize(
    "answer",
    [
        # The engine's bytes are kept but for the usage object; a "usage" inside a string is not it.
        {"id": "x", "choices": [{"message": {"content": '"usage": {"prompt_tokens": 1}}'}}], "usage": {}},
        {"usage": {"prompt_tokens": 3, "completion_tokens": 5}, "id": '"usage":{}'},  # usage not last
        {"a": "\u00e9", "nested": {"usage": {"prompt_tokens": 2}}, "usage": {"completion_tokens": 5}},
    ],
)
def test_usage_merge_rewrites_only_the_answers_own_usage(answer):
    for body in (json.dumps(answer).encode(), json.dumps(answer, ensure_ascii=False, indent=1).encode()):
        merged = merge_usage(body, 11)
        expected = json.loads(body)
        expected["usage"]["prompt_tokens"] = 11
        if "completion_tokens" in expected["usage"]:
            expected["usage"]["total_tokens"] = 11 + expected["usage"]["completion_tokens"]
        assert json.loads(merged) == expected
        if list(answer)[-1] == "usage":
            assert merged.startswith(body[: body.rindex(b'"usage":')])


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


DEEP = b'{"error":' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # deeper than either JSON parser's stack


def test_an_engine_answer_nested_too_deeply_is_read_as_no_json_rather_than_raising():
    answer = LegAnswer.parse(leg("http://p:1", "prefill", "nanodeploy"), 200, DEEP, "application/json")
    assert answer.data is None and answer.message().startswith('{"error":[[[')
    error = decode_failed(leg("http://d:1", "decode", "nanodeploy"), 500, DEEP)
    assert error.status == 502 and "answered 500" in error.message
    with pytest.raises(lmdeploy_wire.WireError):
        lmdeploy_wire.parse_engine_info(DEEP)


def pairs(body: bytes) -> list[tuple[str, object]]:
    """The top-level members of a JSON body in order, duplicates kept (the hook sees it last)."""
    objects: list[list[tuple[str, object]]] = []
    json.loads(body, object_pairs_hook=lambda items: objects.append(items) or dict(items))
    return objects[-1]


def test_the_nanodeploy_legs_send_the_clients_bytes_with_the_handoff_appended():
    """The engines read the client's JSON as it was sent (spacing, escapes, key order), followed by
    the fields the leg adds: nothing of the client's is decoded and encoded again."""
    content = b'"caf\\u00e9 \\ud83d\\ude00"'
    client = b'{"model": "served",  "messages": [{"role": "user", "content": %s}], "max_tokens": 8}\n' % content
    payload = json.loads(client)
    pd = fake_pd(payload)
    pd.request.body = client
    protocol = NanoDeployPd()
    _, prefill, _ = protocol.prefill_request(pd, leg("http://p:1", "prefill", "nanodeploy"))
    assert prefill == client.rstrip()[:-1] + b',"stream":false,"kv_transfer_params":{"do_remote_decode":true}}\n'
    handoff = {"migration": "bWln", "seq_id": 7, "first_token": 3}
    _, decode, _ = protocol.decode_request(pd, leg("http://d:1", "decode", "nanodeploy"), handoff)
    assert decode == client.rstrip()[:-1] + b',"kv_transfer_params":{"migration":"bWln","seq_id":7,"first_token":3}}\n'
    assert sent(decode) == {**payload, "kv_transfer_params": handoff}


@pytest.mark.parametrize(
    ("client", "prefill_stream"),
    [
        ({"model": "m", "messages": [], "stream": False}, False),  # the same value: the client's bytes
        ({"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}, False),
        ({"model": "m", "messages": [], "kv_transfer_params": {"x": 1}}, False),
        ({"model": "alias", "messages": []}, False),  # another served name: model rewritten
    ],
    ids=["stream-false", "stream-true", "own-kv-params", "alias"],
)
def test_a_leg_body_names_each_field_once_whatever_the_client_sent(client, prefill_stream):
    pd = fake_pd(client)
    _, body, _ = NanoDeployPd().prefill_request(pd, leg("http://p:1", "prefill", "nanodeploy"))
    members = pairs(body)
    assert len(members) == len({k for k, _ in members}), f"a field named twice: {body!r}"
    assert dict(members)["stream"] is prefill_stream and "stream_options" not in dict(members)
    assert dict(members)["kv_transfer_params"] == {"do_remote_decode": True}
    assert dict(members)["model"] == "served"
    _, decode, _ = NanoDeployPd().decode_request(pd, leg("http://d:1", "decode", "nanodeploy"), {"seq_id": 7})
    members = pairs(decode)
    assert len(members) == len({k for k, _ in members}) and dict(members)["kv_transfer_params"] == {"seq_id": 7}


async def test_a_decode_leg_that_never_started_leaves_its_node_held_for_release_unused():
    """SGLang's flow starts the decode leg as a task; one cancelled before its first step never ran
    the attempt that releases the decode node, so the pair's release must still do it."""
    targets = {
        "prefill": leg("http://p:1", "prefill", "sglang").target,
        "decode": leg("http://d:1", "decode", "sglang").target,
    }
    released = []
    router = SimpleNamespace(
        choose=lambda route, role, **_: targets[role], release=lambda target, *_, **__: released.append(target)
    )
    request = SimpleNamespace(
        route=SimpleNamespace(name="m", policy=PolicyView()),
        stream=False,
        explain=None,
        payload={},
        headers=RequestHeaders(),
    )
    pd = PdRequest(request, None, router, None, None)  # type: ignore[arg-type]
    pd.choose_pair()
    run_decode(pd, lambda pd, leg: ("/v1/chat/completions", b"{}", {})).close()  # its task was cancelled
    pd.release_unused()
    assert released == [targets["decode"]]
