"""The LMDeploy simulator's streams are written as LMDeploy 0.18 writes them, with and without
``stream_options.include_usage`` (RouterPanel takes out what asking for usage adds: proxy/usage.py,
docs/usage.md): the simulator's events, written again by LMDeploy's own response models the way its
server writes them (``lmdeploy_stream.py``), are the simulator's bytes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from enginesim.testing import run_simulator

pytestmark = pytest.mark.real_engine

WRITER = Path(__file__).resolve().parent / "lmdeploy_stream.py"


@pytest.mark.parametrize(
    ("kind", "path", "prompt"),
    [
        ("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "tell me something"}]}),
        ("completion", "/v1/completions", {"prompt": "tell me something"}),
    ],
)
def test_the_simulators_stream_is_lmdeploys_with_and_without_usage(lmdeploy_python, kind, path, prompt):
    with run_simulator(engine="lmdeploy", served_model_name="m") as sim:
        streams = {
            asked: httpx.post(
                sim.url + path,
                json={"model": "m", **prompt, "stream": True, "max_tokens": 5}
                | ({"stream_options": {"include_usage": True}} if asked else {}),
                timeout=30,
            ).content
            for asked in (False, True)
        }
    for asked, stream in streams.items():
        events = [json.loads(e[6:]) for e in stream.split(b"\n\n") if e.startswith(b"data: {")]
        request = {"kind": kind, "include_usage": asked, "events": events}
        done = subprocess.run(
            [str(lmdeploy_python), str(WRITER)], input=json.dumps(request), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.encode() == stream, asked
    assert b'"usage": null' in streams[True] and b'"usage"' not in streams[False]
