"""Taking a stream's usage chunk that the client did not ask for: the client's bytes are the
engine's bytes without it, however the engine's stream is cut into reads."""

from __future__ import annotations

import json
import random

import pytest

from proxy.usage import TakenUsage, with_usage

FINGERPRINT = "vllm-0.32.0-5f4e3d2c"


def vllm_stream(*, include_usage: bool, kind: str = "chat", pieces: tuple[str, ...] = ("Hel", "lo", " there")) -> bytes:
    """A stream as vLLM 0.32 writes it with continuous usage off (its chat and completion
    ``serving.py``): chunks dumped with ``exclude_unset``, the fingerprint on the terminal chunk only
    when no usage chunk follows, which then carries it."""
    events = []
    head = {"id": "chatcmpl-r1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
    if kind != "chat":
        head = {"id": "cmpl-r1", "object": "text_completion", "created": 1700000000, "model": "m"}
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        if kind == "chat":
            choice = {
                "index": 0,
                "delta": {"content": piece},
                "logprobs": None,
                "finish_reason": "length" if last else None,
            }
        else:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": "length" if last else None}
        chunk = {**head, "choices": [choice]}
        if last and not include_usage:
            chunk["system_fingerprint"] = FINGERPRINT
        events.append(chunk)
    if include_usage:
        usage = {"prompt_tokens": 4, "total_tokens": 7, "completion_tokens": 3}
        events.append({**head, "choices": [], "usage": usage, "system_fingerprint": FINGERPRINT})
    lines = [b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events]
    return b"".join(lines) + b"data: [DONE]\n\n"


def relay(stream: bytes, cuts: list[int]) -> tuple[bytes, TakenUsage]:
    taken = TakenUsage()
    out = b""
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += taken.feed(stream[start:end])
    return out + taken.finish(), taken


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_the_client_gets_the_bytes_it_would_have_got_however_the_stream_is_cut(kind: str) -> None:
    asked, plain = vllm_stream(include_usage=True, kind=kind), vllm_stream(include_usage=False, kind=kind)
    assert asked != plain
    rng = random.Random(7)
    cases = [[], list(range(1, len(asked)))]  # one read; one byte per read
    cases += [sorted(rng.sample(range(1, len(asked)), rng.randint(1, 12))) for _ in range(300)]
    for cuts in cases:
        out, taken = relay(asked, cuts)
        assert out == plain, cuts
        assert b'"usage":{"prompt_tokens":4' in taken.usage


def test_it_holds_nothing_back_before_the_chunk_that_ends_the_answer() -> None:
    asked = vllm_stream(include_usage=True)
    events = asked.split(b"\n\n")
    taken = TakenUsage()
    assert taken.feed(events[0] + b"\n\n") == events[0] + b"\n\n"  # a running chunk goes out at once
    assert taken.feed(events[1] + b"\n\n") == events[1] + b"\n\n"


def test_a_stream_without_a_usage_chunk_passes_unchanged() -> None:
    plain = vllm_stream(include_usage=False)
    out, taken = relay(plain, [10, 200])
    assert out == plain
    assert taken.usage == b""


def test_a_stream_cut_off_inside_its_last_chunk_passes_what_came() -> None:
    asked = vllm_stream(include_usage=True)
    broken = asked[: asked.find(b'"finish_reason":"') + 30]
    out, _ = relay(broken, [5])
    assert out == broken


def test_the_request_asks_for_usage_with_every_other_byte_kept() -> None:
    body = b'{"model": "m", "stream": true,  "messages": [{"role": "user", "content": "}"}]}\n'
    asked = with_usage(body)
    assert asked == body[:-2] + b',"stream_options":{"include_usage":true}}\n'
    assert json.loads(asked)["stream_options"] == {"include_usage": True}


def test_an_engine_that_sends_usage_whatever_it_is_asked_keeps_its_usage_chunk() -> None:
    forced = vllm_stream(include_usage=True).replace(
        b'"finish_reason":"length"}]', b'"finish_reason":"length"}],"usage":{"prompt_tokens":4,"completion_tokens":3}'
    )
    assert forced != vllm_stream(include_usage=True)
    out, taken = relay(forced, [40])
    assert out == forced
    assert taken.usage == b""
