"""A corpus of bad requests against ``/v1`` on a running RouterPanel, on a hybrid route and on a PD
route: every answer is a clear 4xx in the OpenAI error shape, nothing answers 200 or 5xx, no
traceback leaks, and no stored row changes. Input that is valid JSON but odd (a lone surrogate)
gets the same answer on every path: the engine decides, RouterPanel never fails on it."""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3

import httpx
import pytest

from enginesim.testing import run_simulator

pytestmark = pytest.mark.e2e

MODEL = "corpus-model"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def deeply_nested(depth: int) -> bytes:
    return b'{"model": "' + MODEL.encode() + b'", "messages": ' + b"[" * depth + b"]" * depth + b"}"


# (name, path, raw body or None for GOOD, extra headers, expected status or statuses)
CORPUS = [
    ("malformed JSON", "/chat/completions", b'{"model": "corpus-model", "messages": [', {}, 400),
    ("not UTF-8", "/chat/completions", b'{"model": "\xff\xfe"}', {}, 400),
    ("JSON array body", "/chat/completions", b"[1, 2, 3]", {}, 400),
    ("JSON string body", "/completions", b'"prompt"', {}, 400),
    ("empty body", "/chat/completions", b"", {}, 400),
    ("missing model", "/chat/completions", json.dumps({"messages": []}).encode(), {}, 400),
    ("model is a number", "/chat/completions", json.dumps({**GOOD, "model": 42}).encode(), {}, 400),
    ("model is null", "/completions", json.dumps({"model": None, "prompt": "x"}).encode(), {}, 400),
    ("model is a list", "/chat/completions", json.dumps({**GOOD, "model": [MODEL]}).encode(), {}, 400),
    ("unknown model", "/chat/completions", json.dumps({**GOOD, "model": "no-such-model"}).encode(), {}, 404),
    ("messages is a string", "/chat/completions", json.dumps({**GOOD, "messages": "hi"}).encode(), {}, 400),
    ("stream is a string", "/chat/completions", json.dumps({**GOOD, "stream": "yes"}).encode(), {}, 400),
    (
        "max_tokens is negative",
        "/completions",
        json.dumps({"model": MODEL, "prompt": "x", "max_tokens": -5}).encode(),
        {},
        400,
    ),
    ("deeply nested", "/chat/completions", deeply_nested(100_000), {}, (400, 413)),
    (
        "huge body",
        "/chat/completions",
        b'{"model": "corpus-model", "prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}',
        {},
        413,
    ),
    ("missing key", "/chat/completions", None, {"Authorization": ""}, 401),
    ("wrong scheme", "/chat/completions", None, {"Authorization": "Basic Zm9vOmJhcg=="}, 401),
    ("bad key", "/chat/completions", None, {"Authorization": "Bearer rp-not-a-real-key"}, 401),
    ("bad key with junk", "/completions", None, {"Authorization": "Bearer \u00e9\u00e9".encode("latin-1")}, 401),
    ("unknown path", "/nonsense", None, {}, 404),
]


@pytest.fixture(scope="module")
def engines():
    """A plain OpenAI engine for the hybrid route, a NanoDeploy prefill and decode for the PD one."""
    pd = {"engine": "nanodeploy", "served_model_name": MODEL}
    with (
        run_simulator(served_model_name=MODEL) as hybrid,
        run_simulator(role="prefill", **pd) as prefill,
        run_simulator(role="decode", **pd) as decode,
    ):
        yield {"hybrid": [hybrid], "pd": [prefill, decode]}


class Engines:
    """The engines behind the route under test, counted together."""

    def __init__(self, sims) -> None:
        self.sims = sims

    def requests(self) -> int:
        return sum(sim.stats()["requests"]["total"] for sim in self.sims)


def register(stack, engines, path: str) -> None:
    if path == "hybrid":
        stack.add_live_node(engines["hybrid"][0].url, [MODEL], engine_type="openai")
        return
    prefill, decode = engines["pd"]
    stack.add_node(prefill.url, [MODEL], role="prefill", engine_type="nanodeploy", settle=False)
    stack.add_node(decode.url, [MODEL], role="decode", engine_type="nanodeploy", settle=False)
    stack.set_policy(MODEL, serving_mode="pd")


@pytest.fixture(params=["hybrid", "pd"])
def route(request, stack, engines):
    """``MODEL`` on a hybrid node or on a prefill/decode pair; yields the stack and its engines."""
    register(stack, engines, request.param)
    return stack, Engines(engines[request.param])


def database_state(path) -> dict[str, list]:
    """Every row of the registry's tables (a change anywhere shows as a difference)."""
    tables = ["nodes_node", "nodes_modelalias", "nodes_routepolicy", "nodes_apikey", "nodes_configversion"]
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in tables}


@pytest.mark.parametrize(("name", "path", "raw", "headers", "expected"), CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_gets_a_clear_openai_shaped_4xx(route, name, path, raw, headers, expected) -> None:
    registry, engine = route
    before = database_state(registry.database)
    sent_before = engine.requests()
    auth = {"Authorization": f"Bearer {registry.key}", "Content-Type": "application/json"}
    response = httpx.post(
        registry.v1 + path,
        content=json.dumps(GOOD).encode() if raw is None else raw,
        headers={k: v for k, v in {**auth, **headers}.items() if v},
        timeout=30,
    )
    statuses = expected if isinstance(expected, tuple) else (expected,)
    assert response.status_code in statuses, f"{name}: {response.status_code} {response.text[:300]}"
    body = response.json()
    error = body["error"]
    assert {"message", "type", "code"} <= set(error), body
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text
    assert database_state(registry.database) == before
    if response.status_code in (401, 403, 404, 413):
        assert engine.requests() == sent_before  # refused before reaching the engine


@pytest.mark.servers("uvicorn", "daphne")
def test_oversized_headers_are_refused_without_reaching_the_engine(route) -> None:
    registry, engine = route
    before = database_state(registry.database)
    sent_before = engine.requests()
    host, port = registry.base.removeprefix("http://").split(":")
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {registry.key}\r\n"
        f"X-Junk: {'x' * 200_000}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(request)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    status_line = answer.split(b"\r\n", 1)[0]
    # The HTTP server refuses these before the application sees them: the edge (uvicorn) answers
    # 431, daphne closes the connection. Either way nothing reaches the engine or the database.
    assert status_line.startswith(b"HTTP/1.1 431") or answer == b"", status_line
    assert engine.requests() == sent_before
    assert database_state(registry.database) == before


LONE_SURROGATE = b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 4%s}'


def test_a_lone_surrogate_gets_the_same_answer_on_every_path(stack, engines) -> None:
    """A lone surrogate escape is valid JSON that no UTF-8 encoder takes: the hybrid path passes the
    client's bytes on, and the engine answered; the PD path re-encoded them and failed with a 500.
    Now every path that re-encodes (the PD legs, a rewritten alias, a session key's hash) sends it
    as the client did, and the engine's answer comes back the same way."""
    register(stack, engines, "pd")
    with run_simulator(served_model_name="surrogate-hybrid") as hybrid:
        stack.add_node(hybrid.url, ["surrogate-hybrid"], engine_type="openai", settle=False)
        stack.add_alias("surrogate-alias", "surrogate-hybrid")
        stack.set_policy("surrogate-hybrid", strategy="consistent_hash")
        auth = {"Authorization": f"Bearer {stack.key}", "Content-Type": "application/json"}
        cases = {
            "hybrid": LONE_SURROGATE % (b"surrogate-hybrid", b""),
            "hybrid, streamed": LONE_SURROGATE % (b"surrogate-hybrid", b', "stream": true'),
            "hybrid through an alias": LONE_SURROGATE % (b"surrogate-alias", b""),
            "hybrid, consistent hash on the user": LONE_SURROGATE % (b"surrogate-hybrid", b', "user": "\\udfff"'),
            "pd": LONE_SURROGATE % (MODEL.encode(), b""),
            "pd, streamed": LONE_SURROGATE % (MODEL.encode(), b', "stream": true'),
        }
        answers = {
            name: httpx.post(stack.v1 + "/chat/completions", content=body, headers=auth, timeout=30)
            for name, body in cases.items()
        }
    summary = {name: (r.status_code, r.headers.get("content-type"), r.text[:120]) for name, r in answers.items()}
    assert {name: status for name, (status, _, _) in summary.items()} == dict.fromkeys(cases, 200), summary
    for name, response in answers.items():
        if "streamed" in name:
            assert response.text.rstrip().endswith("data: [DONE]"), summary[name]
            assert '"error"' not in response.text, summary[name]
        else:
            assert response.json()["choices"], summary[name]
