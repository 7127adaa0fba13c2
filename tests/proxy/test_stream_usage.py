"""Taking a stream's usage chunk that the client did not ask for: the client's bytes are the
engine's bytes without it, however the engine's stream is cut into reads."""

from __future__ import annotations

import json
import random
import re

import pytest

from proxy.usage import SHAPES, TakenUsage, taken_usage, with_usage
from tests.proxy.engine_streams import ENGINES

vllm_stream = ENGINES["vllm"]


def relay(stream: bytes, cuts: list[int], engine: str = "vllm") -> tuple[bytes, TakenUsage]:
    taken = taken_usage(SHAPES[engine])
    out = b""
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += taken.feed(stream[start:end])
    return out + taken.finish(), taken


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_the_client_gets_the_bytes_it_would_have_got_however_the_stream_is_cut(engine: str, kind: str) -> None:
    stream = ENGINES[engine]
    asked, plain = stream(include_usage=True, kind=kind), stream(include_usage=False, kind=kind)
    assert asked != plain
    rng = random.Random(7)
    cases = [[], list(range(1, len(asked)))]  # one read; one byte per read
    cases += [sorted(rng.sample(range(1, len(asked)), rng.randint(1, 12))) for _ in range(300)]
    cases += [[m.end() for m in re.finditer(rb"\n\n", asked)][:-1]]  # one event per read
    for cuts in cases:
        out, taken = relay(asked, cuts, engine)
        assert out == plain, cuts
        assert b'"prompt_tokens":4' in taken.usage or b'"prompt_tokens": 4' in taken.usage


def test_it_holds_nothing_back_before_the_chunk_that_ends_the_answer() -> None:
    asked = vllm_stream(include_usage=True)
    events = asked.split(b"\n\n")
    taken = TakenUsage(SHAPES["vllm"])
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
