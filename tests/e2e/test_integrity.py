"""Concurrent operators and hostile input against the registry, through a real web process (the
``stack`` fixture): parallel updates lose nothing and the audit trail matches the row, a unique clash
is a 400, stale full updates are a 412, bad input is a 4xx that stores nothing, every interface
validates alike, one backend is one node, and ``max_concurrent=0`` means no limit on a key as on a
node. Each test adds its rows to the fault-and-hostile-input matrix (``tests/matrix.py``)."""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from enginesim.testing import run_simulator
from tests.matrix import Matrix
from tests.support.ports import closed_port
from tests.support.stack import TOKEN, RouterPanelStack

pytestmark = pytest.mark.e2e

MATRIX = Matrix("registry integrity (tests/e2e/test_integrity.py)")
PARALLEL = 10


@pytest.fixture(scope="module", autouse=True)
def _print_matrix() -> Iterator[None]:
    yield
    MATRIX.print()


def in_parallel(base: str, calls: list[Callable[[httpx.Client], httpx.Response]]) -> list[httpx.Response]:
    """Run ``calls`` at once, each on its own thread and connection, released together by a barrier."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[httpx.Client], httpx.Response]) -> httpx.Response:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
            client.get("/api/nodes/", params={"limit": 1})  # connected and authenticated before the race
            barrier.wait()
            return call(client)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def statuses(responses: list[httpx.Response]) -> dict[int, int]:
    return dict(sorted(collections.Counter(r.status_code for r in responses).items()))


def updates_of(stack: RouterPanelStack, node_id: int) -> list[dict[str, Any]]:
    """The node's update records, oldest first."""
    rows = stack.api.get(
        "/api/changes/", params={"object_type": "node", "object_id": node_id, "action": "update", "limit": 1000}
    ).json()["results"]
    return sorted(rows, key=lambda r: r["id"])


def add_unreachable_node(stack: RouterPanelStack, **fields: Any) -> dict[str, Any]:
    return stack.add_node(f"http://127.0.0.1:{closed_port()}", ["integrity-model"], engine_type="openai", **fields)


def test_ten_parallel_patches_of_different_fields_all_survive_and_the_audit_matches(stack: RouterPanelStack) -> None:
    node = add_unreachable_node(stack, settle=False)
    changes: dict[str, Any] = {
        "name": "renamed",
        "weight": 7,
        "max_concurrency": 3,
        "dp_size": 2,
        "kv_connector_address": "10.0.0.1:14579",
        "metadata": {"rack": "b"},
        "bootstrap_port": 8998,
        "engine_type": "vllm",
        "role": "prefill",
        "state": "draining",
    }
    url = f"/api/nodes/{node['id']}/"
    answers = in_parallel(stack.base, [lambda c, f=f, v=v: c.patch(url, json={f: v}) for f, v in changes.items()])
    row = stack.api.get(url).json()
    kept = sum(row[field] == value for field, value in changes.items())
    records = updates_of(stack, node["id"])
    audited = {field: change for record in records for field, change in record["changes"].items()}
    MATRIX.add(
        f"{PARALLEL} parallel PATCH /api/nodes/<id>/, one field each",
        PARALLEL,
        f"{statuses(answers)}; {kept} of {len(changes)} changes kept; {len(records)} audit records",
        ok=kept == len(changes),
    )
    assert statuses(answers) == {200: PARALLEL}
    assert kept == len(changes), {f: (row[f], v) for f, v in changes.items() if row[f] != v}
    assert len(records) == PARALLEL and all(len(r["changes"]) == 1 for r in records)
    # Each field changed once: its record's "before" is the value the node was created with, its
    # "after" is what the row holds.
    assert audited == {field: [node[field], row[field]] for field in changes}


def test_ten_parallel_weight_changes_leave_an_unbroken_audit_chain(stack: RouterPanelStack) -> None:
    node = add_unreachable_node(stack, settle=False)
    url = f"/api/nodes/{node['id']}/"
    weights = list(range(11, 11 + PARALLEL))
    answers = in_parallel(stack.base, [lambda c, w=w: c.patch(url, json={"weight": w}) for w in weights])
    final = stack.api.get(url).json()["weight"]
    chain = [record["changes"]["weight"] for record in updates_of(stack, node["id"])]
    unbroken = all(before == previous[1] for previous, (before, _) in zip([[None, 1], *chain], chain, strict=False))
    MATRIX.add(
        f"{PARALLEL} parallel PATCH weight on one node",
        PARALLEL,
        f"{statuses(answers)}; audit chain 1 -> {final} {'unbroken' if unbroken else 'BROKEN'}, {len(chain)} records",
        ok=unbroken,
    )
    assert statuses(answers) == {200: PARALLEL}
    assert len(chain) == PARALLEL and unbroken and chain[-1][1] == final, chain


def test_ten_parallel_creates_of_one_alias_name_are_one_row_and_nine_400s(stack: RouterPanelStack) -> None:
    body = {"name": f"clash-{time.monotonic_ns()}", "served_name": "integrity-model"}
    answers = in_parallel(stack.base, [lambda c: c.post("/api/aliases/", json=body)] * PARALLEL)
    rows = stack.api.get("/api/aliases/", params={"name": body["name"]}).json()["count"]
    refused = [a.json() for a in answers if a.status_code == 400]
    MATRIX.add(
        f"{PARALLEL} parallel POST /api/aliases/ with one name",
        PARALLEL,
        f"{statuses(answers)}; {rows} row",
        ok=rows == 1 and all(a.status_code < 500 for a in answers),
    )
    assert statuses(answers) == {201: 1, 400: PARALLEL - 1}
    assert rows == 1
    assert all("exists" in json.dumps(body) for body in refused), refused


@pytest.mark.parametrize(
    ("collection", "create", "change"),
    [
        ("nodes", None, {"weight": 5}),
        ("aliases", {"name": "etag-alias", "served_name": "m"}, {"served_name": "n"}),
        ("route-policies", {"model": "etag-model"}, {"retry_budget": 3}),
        ("control-planes", {"address": "127.0.0.1:4479"}, {"scope": "s"}),
        ("api-keys", {"name": "etag-key"}, {"rate_limit_rpm": 60}),
    ],
)
def test_a_stale_full_update_is_a_412(
    stack: RouterPanelStack, collection: str, create: dict | None, change: dict
) -> None:
    if create is None:
        created = add_unreachable_node(stack, settle=False)
    else:
        unique = {"name": f"cp-{time.monotonic_ns()}"} if collection == "control-planes" else {}
        response = stack.api.post(f"/api/{collection}/", json={**create, **unique})
        assert response.status_code == 201, response.text
        created = response.json()
    url = f"/api/{collection}/{created['id']}/"
    read = stack.api.get(url)
    etag = read.headers["ETag"]
    assert stack.api.patch(url, json=change, headers={"If-Match": etag}).status_code == 200  # someone else
    full = {k: v for k, v in read.json().items() if v is not None}
    stale = stack.api.put(url, json=full, headers={"If-Match": etag})
    current = stack.api.put(url, json=full, headers={"If-Match": stack.api.get(url).headers["ETag"]})
    MATRIX.add(
        f"stale PUT /api/{collection}/<id>/ with If-Match",
        1,
        f"{stale.status_code}; then current {current.status_code}",
    )
    assert (stale.status_code, current.status_code) == (412, 200), (stale.text, current.text)
    if collection != "nodes":  # the stack's reset removes nodes; the rest would outlive the test
        assert stack.api.delete(url).status_code == 204


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


BAD_INPUT = [
    (
        "POST /api/nodes/ metadata nested 5,000 deep",
        "/api/nodes/",
        '{"url": "http://10.9.9.9:8000", "engine_type": "openai", "models": ["m"], "metadata": ' + _nested(5000) + "}",
    ),
    (
        "POST /nodes/add nested 100,000 deep",
        "/nodes/add",
        '{"url": "http://10.9.9.9:8000", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ),
    (
        "POST /nodes/add with NaN",
        "/nodes/add",
        '{"url": "http://10.9.9.9:8000", "engine_type": "openai", "status": {"models": ["m"], "speed": NaN}}',
    ),
    (
        'POST /nodes/add models ["\\ud800"]',
        "/nodes/add",
        '{"url": "http://10.9.9.9:8000", "engine_type": "openai", "status": {"models": ["\\ud800"]}}',
    ),
    (
        'POST /api/nodes/ models ["\\ud800"]',
        "/api/nodes/",
        '{"url": "http://10.9.9.9:8000", "engine_type": "openai", "models": ["\\ud800"]}',
    ),
    (
        "POST /nodes/add model name with a NUL byte",
        "/nodes/add",
        '{"url": "http://10.9.9.9:8000", "engine_type": "openai", "status": {"models": ["a\\u0000b"]}}',
    ),
    (
        "POST /api/nodes/ model name with a NUL byte",
        "/api/nodes/",
        '{"url": "http://10.9.9.9:8000", "engine_type": "openai", "models": ["a\\u0000b"]}',
    ),
    (
        "POST /nodes/add URL with a space",
        "/nodes/add",
        '{"url": "http://10.9.9.9:8000/a b", "engine_type": "openai", "status": {"models": ["m"]}}',
    ),
    (
        "POST /api/nodes/ URL with a space",
        "/api/nodes/",
        '{"url": "http://10.9.9.9:8000/a b", "engine_type": "openai", "models": ["m"]}',
    ),
]


@pytest.mark.parametrize(("tried", "path", "body"), BAD_INPUT, ids=[row[0] for row in BAD_INPUT])
def test_bad_input_is_a_4xx_and_stores_nothing(stack: RouterPanelStack, tried: str, path: str, body: str) -> None:
    response = stack.api.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
    stored = stack.api.get("/api/nodes/").json()["count"]
    MATRIX.add(
        tried,
        1,
        f"{response.status_code} {response.headers.get('content-type', '')}; {stored} nodes stored",
        ok=response.status_code < 500 and stored == 0,
    )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert stored == 0


def test_a_huge_limit_is_the_largest_page_not_a_500(stack: RouterPanelStack) -> None:
    response = stack.api.get("/api/nodes/", params={"limit": "99999999999999999999"})
    MATRIX.add("GET /api/nodes/?limit=99999999999999999999", 1, f"{response.status_code} (page capped at 1000)")
    assert response.status_code == 200 and response.json()["count"] == 0


def test_five_spellings_of_one_loopback_backend_are_one_node(stack: RouterPanelStack) -> None:
    port = closed_port()
    spellings = ["127.0.0.1", "localhost", "127.1", "2130706433", "[::ffff:127.0.0.1]"]
    added = [
        stack.api.post(
            "/nodes/add", json={"url": f"http://{host}:{port}", "engine_type": "openai", "status": {"models": ["m"]}}
        ).status_code
        for host in spellings
    ]
    rest = [
        stack.api.post("/api/nodes/", json={"url": f"http://{host}:{port}", "engine_type": "openai", "models": ["m"]})
        for host in spellings
    ]
    urls = [row["url"] for row in stack.api.get("/api/nodes/").json()["results"]]
    MATRIX.add(
        "/nodes/add, then POST /api/nodes/, with 5 spellings of 127.0.0.1",
        2 * len(spellings),
        f"/nodes/add {dict(collections.Counter(added))}, REST {statuses(rest)}; {len(urls)} node",
        ok=len(urls) == 1,
    )
    assert added == [200] * len(spellings)  # /nodes/add updates the node it names (an engine registering again)
    assert statuses(rest) == {400: len(spellings)} and all("already exists" in r.text for r in rest)
    assert urls == [f"http://127.0.0.1:{port}"]


def test_a_key_with_max_concurrent_0_is_unlimited_like_a_node(stack: RouterPanelStack) -> None:
    with run_simulator(served_model_name="limit-model", extra_args=["--fast"]) as engine:
        stack.add_node(engine.url, ["limit-model"], engine_type="openai", max_concurrency=0)
        key = stack.add_key(max_concurrent=0)
        body = {"model": "limit-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        answers = [
            httpx.post(
                stack.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
            )
            for _ in range(3)
        ]
    MATRIX.add(
        "/v1 with a key and a node whose limit is 0",
        len(answers),
        f"{statuses(answers)}",
        ok=statuses(answers) == {200: len(answers)},
    )
    assert statuses(answers) == {200: len(answers)}, [a.text for a in answers]


def _form_value(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match is not None, f"no {name} in the page"
    return match.group(1)


def test_the_admin_refuses_to_overwrite_a_row_changed_since_its_form_was_opened(stack: RouterPanelStack) -> None:
    created = stack.api.post("/api/api-keys/", json={"name": f"admin-race-{time.monotonic_ns()}"}).json()
    page = f"/admin/nodes/apikey/{created['id']}/change/"
    with httpx.Client(base_url=stack.base, timeout=10) as browser:
        login = browser.get("/admin/login/")
        browser.post(
            "/admin/login/",
            data={
                "csrfmiddlewaretoken": _form_value(login.text, "csrfmiddlewaretoken"),
                "username": "admin",
                "password": "e2e-admin-password",
                "next": "/admin/",
            },
        )
        opened = browser.get(page).text
        # Another operator raises the key's limit while the form is open.
        assert stack.api.patch(f"/api/api-keys/{created['id']}/", json={"rate_limit_rpm": 600}).status_code == 200
        form = {
            "csrfmiddlewaretoken": _form_value(opened, "csrfmiddlewaretoken"),
            "row_version": _form_value(opened, "row_version"),
            "name": "renamed in the admin",
            "allowed_models": "[]",
            "rate_limit_rpm": "",
            "max_concurrent": "",
            "is_active": "on",
        }
        refused = browser.post(page, data=form)
    row = stack.api.get(f"/api/api-keys/{created['id']}/").json()
    MATRIX.add(
        "admin change form saved over a change made since it was opened",
        1,
        f"{refused.status_code} with a form error; rate limit still {row['rate_limit_rpm']}",
        ok=row["rate_limit_rpm"] == 600,
    )
    assert refused.status_code == 200 and "Someone changed this API key since you opened this page" in refused.text
    assert (row["name"], row["rate_limit_rpm"]) == (created["name"], 600)
    stack.api.delete(f"/api/api-keys/{created['id']}/")
