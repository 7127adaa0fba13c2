"""A corpus of bad requests against ``/v1`` on a running RouterPanel: every answer is a clear 4xx in
the OpenAI error shape, nothing answers 200 or 5xx, no traceback leaks, and no stored row changes."""

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
def engine():
    with run_simulator(served_model_name=MODEL) as sim:
        yield sim


@pytest.fixture
def registry(stack, engine):
    stack.add_node(engine.url, [MODEL], engine_type="openai")
    return stack


def database_state(path) -> dict[str, list]:
    """Every row of the registry's tables (a change anywhere shows as a difference)."""
    tables = ["nodes_node", "nodes_modelalias", "nodes_routepolicy", "nodes_apikey", "nodes_configversion"]
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in tables}


@pytest.mark.parametrize(("name", "path", "raw", "headers", "expected"), CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_gets_a_clear_openai_shaped_4xx(registry, engine, name, path, raw, headers, expected) -> None:
    before = database_state(registry.database)
    sent_before = engine.stats()["requests"]["total"]
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
        assert engine.stats()["requests"]["total"] == sent_before  # refused before reaching the engine


def test_oversized_headers_are_refused_without_reaching_the_engine(registry, engine) -> None:
    before = database_state(registry.database)
    sent_before = engine.stats()["requests"]["total"]
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
    # The HTTP server refuses these before the application sees them: uvicorn answers 400 in plain
    # text, daphne closes the connection. Either way nothing reaches the engine or the database.
    assert status_line.startswith(b"HTTP/1.1 4") or answer == b"", status_line
    assert engine.stats()["requests"]["total"] == sent_before
    assert database_state(registry.database) == before
