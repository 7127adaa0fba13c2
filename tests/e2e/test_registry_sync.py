"""The NanoCtrl sync end to end: the real NanoCtrl binary and Redis, simulated engines registering
themselves, RouterPanel's web process, a Celery worker and beat, the registry listener and the
prober (a registered engine takes traffic after its first good probe)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
import redis

from enginesim.testing import run_simulator
from tests.procs import (
    BIN,
    PYTHON,
    REPO_ROOT,
    celery_argv,
    free_port,
    prober_argv,
    redis_db,
    routerpanel_env,
    running,
    stop_process,
    uvicorn_argv,
    wait_for_port,
)

pytestmark = pytest.mark.e2e

TOKEN = "e2e2222222222222222222222222222222222222"
PROXY_KEY = "rp-e2e-registry-key"
SYNC_INTERVAL = 2


def wait_until(predicate: Callable[[], object], *, timeout: float, interval: float = 0.05, what: str = "") -> float:
    """Poll until ``predicate()`` is truthy; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what or 'condition'} not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started


class NanoCtrl:
    """The real NanoCtrl server, which a test may stop and start again on the same port."""

    def __init__(self, redis_url: str) -> None:
        self.port = free_port()
        self.redis_url = redis_url
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [str(BIN / "nanoctrl"), "server", "--host=127.0.0.1", f"--port={self.port}"]
        self.proc = subprocess.Popen(
            [*argv, f"--redis-url={self.redis_url}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def post(self, path: str, body: dict) -> dict:
        return httpx.post(f"http://{self.address}/{path}", json=body, timeout=5).json()


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, redis_server: str) -> Iterator[dict]:
    """RouterPanel's processes on a database of their own, and a running NanoCtrl."""
    directory = tmp_path_factory.mktemp("registry-e2e")
    redis_root = redis_server.rsplit("/", 1)[0]
    env = routerpanel_env(
        directory, redis_db(redis_server, 3), token=TOKEN, proxy_key=PROXY_KEY, ROUTERPANEL_REGISTRY_TIMEOUT="2"
    )
    nanoctrl = NanoCtrl(redis_root)
    nanoctrl.start()
    web_port = free_port()
    with contextlib.ExitStack() as stack:
        stack.callback(nanoctrl.stop)
        stack.enter_context(running(uvicorn_argv(web_port), port=web_port, env=env, timeout=60))
        stack.enter_context(running(celery_argv("worker", "--concurrency=1"), env=env))
        stack.enter_context(running(celery_argv("beat", "-s", str(directory / "beat")), env=env))
        stack.enter_context(running([PYTHON, "manage.py", "listen_registry", "--reload-interval=0.5"], env=env))
        stack.enter_context(running(prober_argv(), env=env))
        api = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{web_port}", headers={"Authorization": f"Bearer {TOKEN}"})
        )
        yield {
            "api": api,
            "nanoctrl": nanoctrl,
            "env": env,
            "base": f"http://127.0.0.1:{web_port}",
            "redis": redis_root,
        }


@pytest.fixture
def scope() -> str:
    return f"e2e-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def control_plane(system: dict, scope: str) -> Iterator[dict]:
    """A control plane of its own for each test (its own scope), removed afterwards with its nodes."""
    api: httpx.Client = system["api"]
    body = {
        "name": scope,
        "address": system["nanoctrl"].address,
        "scope": scope,
        "sync_interval": SYNC_INTERVAL,
        "redis_url": system["redis"] + "/0",
    }
    created = api.post("/api/control-planes/", json=body)
    assert created.status_code == 201, created.text
    cp = created.json()
    # Wait until the listener has subscribed to this scope's channel (it reloads every 0.5 s).
    events = redis.Redis.from_url(system["redis"])
    channel = f"{scope}:nano_events:service_update"
    wait_until(lambda: events.pubsub_numsub(channel)[0][1] >= 1, timeout=15, what="listener subscribed")
    events.close()
    yield cp
    leftovers = nodes(api, cp["id"])
    api.delete(f"/api/control-planes/{cp['id']}/")
    for node in leftovers:
        api.delete(f"/api/nodes/{node['id']}/")


def nodes(api: httpx.Client, control_plane_id: int) -> list[dict]:
    listed = api.get("/api/nodes/", params={"control_plane": control_plane_id, "limit": 1000})
    return listed.json()["results"]


def node_at(api: httpx.Client, url: str) -> dict | None:
    found = api.get("/api/nodes/", params={"url": url}).json()["results"]
    return next((n for n in found if n["url"] == url), None)


def engine_args(system: dict, scope: str) -> list[str]:
    return [f"--ctrl-address={system['nanoctrl'].address}", f"--ctrl-scope={scope}", "--heartbeat-interval=1"]


def routable_models(system: dict) -> set[str]:
    client = openai.OpenAI(base_url=system["base"] + "/v1", api_key=PROXY_KEY, max_retries=0)
    return {m.id for m in client.models.list().data}


def test_a_registered_engine_is_routable_within_2_s_and_serves_requests(system, control_plane, scope) -> None:
    model = f"m-{scope}"
    with run_simulator(engine="nanodeploy", served_model_name=model, extra_args=engine_args(system, scope)) as sim:
        took = wait_until(lambda: model in routable_models(system), timeout=10, what="model routable")
        print(f"\nregistered engine routable through the proxy after {took:.2f} s")
        assert took < 2.0
        node = node_at(system["api"], sim.url)
        assert (node["source"], node["role"], node["kind"], node["scope"]) == (
            "registry",
            "hybrid",
            "nanodeploy",
            scope,
        )
        client = openai.OpenAI(base_url=system["base"] + "/v1", api_key=PROXY_KEY, max_retries=0)
        answer = client.completions.create(model=model, prompt="hello", max_tokens=4)
        assert answer.choices[0].text
        assert sim.stats()["requests"]["by_endpoint"].get("/v1/completions") == 1


def test_a_role_change_in_the_registry_changes_the_nodes_role(system, control_plane, scope) -> None:
    model = f"m-{scope}"
    with run_simulator(engine="nanodeploy", served_model_name=model, extra_args=engine_args(system, scope)) as sim:
        wait_until(lambda: node_at(system["api"], sim.url), timeout=5, what="node created")
        entity_id = f"nanodeploy-{model}-127.0.0.1:{sim.port}"
        listed = system["nanoctrl"].post("list_entities", {"entity_type": "service", "scope": scope})["entities"]
        entity = next(e for e in listed if e["entity_id"] == entity_id)
        entity["metadata"]["role"] = "decode"
        answer = system["nanoctrl"].post(
            "register",
            {k: entity[k] for k in ("entity_id", "kind", "endpoint", "metadata")} | {"scope": scope},
        )
        assert answer["status"] == "ok"
        took = wait_until(lambda: node_at(system["api"], sim.url)["role"] == "decode", timeout=5, what="role")
        assert took < 2.0


def test_a_clean_unregister_marks_the_node_gone_within_2_s(system, control_plane, scope) -> None:
    with run_simulator(
        engine="nanodeploy", served_model_name=f"m-{scope}", extra_args=engine_args(system, scope)
    ) as sim:
        wait_until(lambda: node_at(system["api"], sim.url), timeout=5, what="node created")
        url = sim.url
        sim.proc.send_signal(signal.SIGTERM)  # the engine unregisters on a clean shutdown
        sim.proc.wait(timeout=10)
        took = wait_until(lambda: node_at(system["api"], url)["state"] == "gone", timeout=5, what="gone")
    print(f"\ncleanly stopped engine marked gone after {took:.2f} s")
    assert took < 2.0
    assert node_at(system["api"], url) is not None  # kept, not deleted


@pytest.mark.slow
def test_a_killed_engine_is_marked_gone_after_its_ttl_and_one_sync(system, control_plane, scope) -> None:
    with run_simulator(
        engine="nanodeploy", served_model_name=f"m-{scope}", extra_args=engine_args(system, scope)
    ) as sim:
        wait_until(lambda: node_at(system["api"], sim.url), timeout=5, what="node created")
        url = sim.url
        sim.proc.kill()  # no unregister: only the TTL expiry (which publishes no event) removes it
        sim.proc.wait(timeout=10)
        killed = time.monotonic()
        wait_until(lambda: node_at(system["api"], url)["state"] == "gone", timeout=60 + 3 * SYNC_INTERVAL + 20)
    took = time.monotonic() - killed
    print(f"\nSIGKILLed engine marked gone after {took:.1f} s (TTL 60 s + sync interval {SYNC_INTERVAL} s)")
    assert 50 < took < 60 + 2 * SYNC_INTERVAL + 10


def test_a_registry_outage_changes_no_node_and_recovers_without_duplicates(system, control_plane, scope) -> None:
    api: httpx.Client = system["api"]
    model = f"m-{scope}"
    with (
        run_simulator(engine="nanodeploy", served_model_name=model, extra_args=engine_args(system, scope)),
        run_simulator(engine="nanodeploy", served_model_name=model, extra_args=engine_args(system, scope)),
    ):
        wait_until(lambda: len(nodes(api, control_plane["id"])) == 2, timeout=5, what="two nodes")
        wait_until(lambda: model in routable_models(system), timeout=10, what="model routable")
        before = sorted((n["id"], n["url"], n["state"], n["role"]) for n in nodes(api, control_plane["id"]))
        system["nanoctrl"].stop()
        try:
            client = openai.OpenAI(base_url=system["base"] + "/v1", api_key=PROXY_KEY, max_retries=0)
            deadline = time.monotonic() + 30
            served = 0
            while time.monotonic() < deadline:
                answer = client.completions.create(model=model, prompt="still there?", max_tokens=2)
                assert answer.choices[0].text
                served += 1
                time.sleep(0.5)
            cp = api.get(f"/api/control-planes/{control_plane['id']}/").json()
            assert cp["sync_state"] == "failed"
            assert "unreachable" in cp["last_sync_error"]
            assert sorted((n["id"], n["url"], n["state"], n["role"]) for n in nodes(api, control_plane["id"])) == before
            print(f"\nNanoCtrl down 30 s: {served} requests served, nodes unchanged, control plane failed")
        finally:
            system["nanoctrl"].start()
        wait_until(
            lambda: api.get(f"/api/control-planes/{control_plane['id']}/").json()["sync_state"] == "ok",
            timeout=20,
            what="sync recovered",
        )
        after = sorted((n["id"], n["url"], n["state"], n["role"]) for n in nodes(api, control_plane["id"]))
        assert after == before  # same rows: no duplicates, nothing marked gone
        listed = system["nanoctrl"].post("list_entities", {"entity_type": "service", "scope": scope})["entities"]
        assert len(listed) == 2


@contextlib.contextmanager
def slow_registry(delay: float) -> Iterator[str]:
    """A NanoCtrl stand-in whose listing takes ``delay`` seconds (so two syncs surely overlap)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            time.sleep(delay)
            body = json.dumps({"status": "ok", "entities": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_two_concurrent_sync_nodes_runs_one_syncs_the_other_skips(system, scope) -> None:
    api: httpx.Client = system["api"]
    env = {**system["env"], "ROUTERPANEL_REGISTRY_TIMEOUT": "20"}
    with slow_registry(delay=4.0) as address:
        cp = api.post("/api/control-planes/", json={"name": scope, "address": address, "enabled": False}).json()
        try:
            command = [PYTHON, "manage.py", "sync_nodes", scope]
            runs = [
                subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
            ]
            outputs = [run.communicate(timeout=60)[0] for run in runs]
        finally:
            api.delete(f"/api/control-planes/{cp['id']}/")
    assert sorted("skipped: another sync" in out for out in outputs) == [False, True], outputs
    assert any("listed 0" in out for out in outputs), outputs


def test_scopes_are_isolated_and_manual_edits_survive_syncs(system, control_plane, scope) -> None:
    api: httpx.Client = system["api"]
    other_scope = scope + "-other"
    with (
        run_simulator(engine="nanodeploy", served_model_name="mine", extra_args=engine_args(system, scope)) as mine,
        run_simulator(
            engine="nanodeploy", served_model_name="theirs", extra_args=engine_args(system, other_scope)
        ) as theirs,
    ):
        wait_until(lambda: node_at(api, mine.url), timeout=5, what="own node")
        time.sleep(2 * SYNC_INTERVAL)
        assert node_at(api, theirs.url) is None  # another scope's engine is not ours
        node = node_at(api, mine.url)
        assert api.patch(f"/api/nodes/{node['id']}/", json={"weight": 7, "state": "disabled"}).status_code == 200
        time.sleep(3 * SYNC_INTERVAL)
        cp = api.get(f"/api/control-planes/{control_plane['id']}/").json()
        assert cp["sync_state"] == "ok" and cp["last_sync_counts"]["listed"] == 1
        node = node_at(api, mine.url)
        assert (node["weight"], node["state"]) == (7, "disabled")


def chat_status(system: dict, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    headers = {"Authorization": f"Bearer {PROXY_KEY}"}
    return httpx.post(system["base"] + "/v1/chat/completions", json=body, headers=headers, timeout=10).status_code


def test_with_manual_approval_a_registered_engine_waits_pending_until_approved(system, control_plane, scope) -> None:
    api: httpx.Client = system["api"]
    assert api.patch(f"/api/control-planes/{control_plane['id']}/", json={"approval_mode": "manual"}).status_code == 200
    model = f"m-{scope}"
    with run_simulator(engine="nanodeploy", served_model_name=model, extra_args=engine_args(system, scope)) as sim:
        wait_until(lambda: node_at(api, sim.url), timeout=5, what="node created")
        node = node_at(api, sim.url)
        assert (node["state"], node["source"]) == ("pending", "registry")
        assert model not in routable_models(system)
        assert chat_status(system, model) == 503
        time.sleep(2 * SYNC_INTERVAL)  # later syncs and events keep it pending
        assert node_at(api, sim.url)["state"] == "pending"
        assert sim.stats()["requests"]["by_endpoint"].get("/v1/chat/completions", 0) == 0

        assert api.post(f"/api/nodes/{node['id']}/approve/").status_code == 200
        took = wait_until(lambda: chat_status(system, model) == 200, timeout=5, what="served after approval")
        print(f"\napproved registry node served {took:.2f} s after the approval")
        assert sim.stats()["requests"]["by_endpoint"]["/v1/chat/completions"] >= 1
        time.sleep(2 * SYNC_INTERVAL)
        assert node_at(api, sim.url)["state"] == "active"


def test_an_engine_outside_the_allowed_networks_is_refused_and_counted(system, control_plane, scope) -> None:
    api: httpx.Client = system["api"]
    path = f"/api/control-planes/{control_plane['id']}/"
    assert api.patch(path, json={"allowed_networks": ["10.0.0.0/8"]}).status_code == 200
    with run_simulator(
        engine="nanodeploy", served_model_name=f"m-{scope}", extra_args=engine_args(system, scope)
    ) as sim:
        wait_until(
            lambda: api.get(path).json()["last_sync_counts"].get("refused") == 1, timeout=15, what="refused by a sync"
        )
        answer = api.post(path + "sync/")
        while answer.status_code == 409:  # the scheduled sync holds the lock: ask again
            time.sleep(0.2)
            answer = api.post(path + "sync/")
        result = answer.json()
        assert (result["listed"], result["refused"], result["created"]) == (1, 1, 0)
        assert "outside the allowed networks" in " ".join(result["problems"])
        assert node_at(api, sim.url) is None
