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
from tests.support.procs import PYTHON, REPO_ROOT, NanoCtrl
from tests.support.stack import FULL_STACK, RouterPanelStack, StackPool
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.stack(FULL_STACK)]

SYNC_INTERVAL = 2


@pytest.fixture(scope="module")
def registry_stack(stacks: StackPool) -> RouterPanelStack:
    """FULL_STACK, reset once for the module. Each test here works in a scope and a control plane
    of its own and removes them, so the stack is not reset between tests, which lets the TTL test's
    control plane (``killed_engine``) live through the module."""
    stack = stacks.get(FULL_STACK)
    stack.reset()
    return stack


@pytest.fixture
def stack(registry_stack: RouterPanelStack) -> RouterPanelStack:
    """This module's stack, not reset per test (see ``registry_stack``)."""
    return registry_stack


def nanoctrl_of(stack: RouterPanelStack) -> NanoCtrl:
    assert stack.nanoctrl is not None
    return stack.nanoctrl


def timed(condition: Callable[[], object], timeout: float, message: str) -> float:
    """``wait_until``, returning the seconds it took."""
    started = time.monotonic()
    wait_until(condition, timeout, message)
    return time.monotonic() - started


def new_scope() -> str:
    return f"e2e-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def scope() -> str:
    return new_scope()


@contextlib.contextmanager
def control_plane_for(stack: RouterPanelStack, scope: str, nanoctrl: NanoCtrl) -> Iterator[dict]:
    """A control plane for ``scope`` on ``nanoctrl``, removed afterwards with its nodes."""
    body = {
        "name": scope,
        "address": nanoctrl.address,
        "scope": scope,
        "sync_interval": SYNC_INTERVAL,
        "redis_url": nanoctrl.redis_url + "/0",
    }
    created = stack.api.post("/api/control-planes/", json=body)
    assert created.status_code == 201, created.text
    cp = created.json()
    # Wait until the listener has subscribed to this scope's channel (it reloads every 0.5 s).
    with redis.Redis.from_url(nanoctrl.redis_url) as events:
        channel = f"{scope}:nano_events:service_update"
        wait_until(lambda: events.pubsub_numsub(channel)[0][1] >= 1, 15, "the listener never subscribed")
    try:
        yield cp
    finally:
        leftovers = nodes(stack.api, cp["id"])
        stack.api.delete(f"/api/control-planes/{cp['id']}/")
        for node in leftovers:
            stack.api.delete(f"/api/nodes/{node['id']}/")


@pytest.fixture
def control_plane(stack: RouterPanelStack, scope: str) -> Iterator[dict]:
    """A control plane of its own for each test (its own scope) on the stack's NanoCtrl."""
    with control_plane_for(stack, scope, nanoctrl_of(stack)) as cp:
        yield cp


def nodes(api: httpx.Client, control_plane_id: int) -> list[dict]:
    listed = api.get("/api/nodes/", params={"control_plane": control_plane_id, "limit": 1000})
    return listed.json()["results"]


def node_at(api: httpx.Client, url: str) -> dict | None:
    found = api.get("/api/nodes/", params={"url": url}).json()["results"]
    return next((n for n in found if n["url"] == url), None)


def engine_args(stack: RouterPanelStack, scope: str, *, nanoctrl: NanoCtrl | None = None) -> list[str]:
    """A simulator's flags to register in ``scope`` with ``nanoctrl`` (the stack's by default)."""
    address = (nanoctrl or nanoctrl_of(stack)).address
    return [f"--ctrl-address={address}", f"--ctrl-scope={scope}", "--heartbeat-interval=1"]


def proxy_client(stack: RouterPanelStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.v1, api_key=stack.key, max_retries=0)


def routable_models(stack: RouterPanelStack) -> set[str]:
    return {m.id for m in proxy_client(stack).models.list().data}


def wait_for_syncs(stack: RouterPanelStack, control_plane_id: int, count: int) -> None:
    """Wait until ``count`` more syncs of the control plane have finished (each one sets
    ``last_sync_at``): all but the first of them began after this call."""

    def last_sync_at() -> str | None:
        return stack.api.get(f"/api/control-planes/{control_plane_id}/").json()["last_sync_at"]

    seen = [last_sync_at()]

    def finished() -> bool:
        if (at := last_sync_at()) != seen[-1]:
            seen.append(at)
        return len(seen) > count

    wait_until(finished, count * SYNC_INTERVAL + 15, f"fewer than {count} syncs finished", interval=0.1)


TTL_TEST = "test_a_killed_engine_stays_listed_until_its_60_s_ttl_then_is_marked_gone_after_one_sync"


class KilledEngine(threading.Thread):
    """An engine SIGKILLed in a scope and control plane of its own, then watched every half second:
    when NanoCtrl stopped listing it and when RouterPanel marked its node gone (seconds after the kill)."""

    def __init__(self, stack: RouterPanelStack, scope: str, entity_id: str, url: str) -> None:
        super().__init__(name="killed-engine-watch", daemon=True)
        self.stack, self.scope, self.entity_id, self.url = stack, scope, entity_id, url
        self.killed_at = time.monotonic()
        self.listed_after_kill = entity_id in nanoctrl_of(stack).entities(scope)
        self.expired_after: float | None = None
        self.gone_after: float | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        nanoctrl = nanoctrl_of(self.stack)
        with httpx.Client(base_url=self.stack.base, headers=self.stack.api.headers, timeout=5) as api:
            while not self.stopped.wait(0.5) and self.gone_after is None:
                with contextlib.suppress(httpx.HTTPError, AssertionError):
                    if self.expired_after is None and self.entity_id not in nanoctrl.entities(self.scope):
                        self.expired_after = time.monotonic() - self.killed_at
                with contextlib.suppress(httpx.HTTPError):
                    if (node_at(api, self.url) or {}).get("state") == "gone":
                        self.gone_after = time.monotonic() - self.killed_at


@pytest.fixture(scope="module", autouse=True)
def killed_engine(request: pytest.FixtureRequest, registry_stack: RouterPanelStack) -> Iterator[KilledEngine | None]:
    """When the slow TTL test is selected: an engine killed as the module starts, so that NanoCtrl's
    60 s TTL runs out while the other tests run rather than after them. The TTL test, last in the
    module, reads what the watch saw."""
    if not any(item.originalname == TTL_TEST for item in request.session.items):
        yield None
        return
    stack, scope = registry_stack, new_scope()
    model = f"m-{scope}"
    with control_plane_for(stack, scope, nanoctrl_of(stack)):
        with run_simulator(engine="nanodeploy", served_model_name=model, extra_args=engine_args(stack, scope)) as sim:
            wait_until(lambda: node_at(stack.api, sim.url), 5, "the node was never created")
            sim.proc.kill()  # no unregister: only the TTL expiry (which publishes no event) removes it
            sim.proc.wait(timeout=10)
            watch = KilledEngine(stack, scope, f"nanodeploy-{model}-127.0.0.1:{sim.port}", sim.url)
        watch.start()
        try:
            yield watch
        finally:
            watch.stopped.set()
            watch.join(timeout=10)


def test_a_registered_engine_is_routable_within_2_s_and_serves_requests(stack, control_plane, scope) -> None:
    model = f"m-{scope}"
    with run_simulator(engine="nanodeploy", served_model_name=model, extra_args=engine_args(stack, scope)) as sim:
        took = timed(lambda: model in routable_models(stack), 10, "the model never became routable")
        print(f"\nregistered engine routable through the proxy after {took:.2f} s")
        assert took < 2.0
        node = node_at(stack.api, sim.url)
        assert (node["source"], node["role"], node["kind"], node["scope"]) == (
            "registry",
            "hybrid",
            "nanodeploy",
            scope,
        )
        answer = proxy_client(stack).completions.create(model=model, prompt="hello", max_tokens=4)
        assert answer.choices[0].text
        assert sim.stats()["requests"]["by_endpoint"].get("/v1/completions") == 1


def test_a_role_change_in_the_registry_changes_the_nodes_role(stack, control_plane, scope) -> None:
    model = f"m-{scope}"
    nanoctrl = nanoctrl_of(stack)
    with run_simulator(engine="nanodeploy", served_model_name=model, extra_args=engine_args(stack, scope)) as sim:
        wait_until(lambda: node_at(stack.api, sim.url), 5, "the node was never created")
        entity_id = f"nanodeploy-{model}-127.0.0.1:{sim.port}"
        entity = nanoctrl.entities(scope)[entity_id]
        entity["metadata"]["role"] = "decode"
        answer = nanoctrl.post(
            "register",
            {k: entity[k] for k in ("entity_id", "kind", "endpoint", "metadata")} | {"scope": scope},
        )
        assert answer["status"] == "ok"
        took = timed(lambda: node_at(stack.api, sim.url)["role"] == "decode", 5, "the role never changed")
        assert took < 2.0


def test_a_clean_unregister_marks_the_node_gone_within_2_s(stack, control_plane, scope) -> None:
    with run_simulator(
        engine="nanodeploy", served_model_name=f"m-{scope}", extra_args=engine_args(stack, scope)
    ) as sim:
        wait_until(lambda: node_at(stack.api, sim.url), 5, "the node was never created")
        url = sim.url
        sim.proc.send_signal(signal.SIGTERM)  # the engine unregisters on a clean shutdown
        sim.proc.wait(timeout=10)
        took = timed(lambda: node_at(stack.api, url)["state"] == "gone", 5, "the node was never marked gone")
    print(f"\ncleanly stopped engine marked gone after {took:.2f} s")
    assert took < 2.0
    assert node_at(stack.api, url) is not None  # kept, not deleted


def test_a_registry_outage_changes_no_node_and_recovers_without_duplicates(stack, scope) -> None:
    """The registry that goes away is a NanoCtrl of this test's own (on the same Redis), so the
    stack's NanoCtrl stays up for the engine the TTL test watches meanwhile."""
    api = stack.api
    nanoctrl = NanoCtrl(nanoctrl_of(stack).redis_url).start()
    model = f"m-{scope}"
    flags = engine_args(stack, scope, nanoctrl=nanoctrl)
    try:
        with (
            control_plane_for(stack, scope, nanoctrl) as control_plane,
            run_simulator(engine="nanodeploy", served_model_name=model, extra_args=flags),
            run_simulator(engine="nanodeploy", served_model_name=model, extra_args=flags),
        ):
            wait_until(lambda: len(nodes(api, control_plane["id"])) == 2, 5, "the two nodes were never created")
            wait_until(lambda: model in routable_models(stack), 10, "the model never became routable")
            before = sorted((n["id"], n["url"], n["state"], n["role"]) for n in nodes(api, control_plane["id"]))
            nanoctrl.stop()
            try:
                client = proxy_client(stack)
                deadline = time.monotonic() + 30
                served = 0
                while time.monotonic() < deadline:  # 30 s of outage, a request every half second
                    answer = client.completions.create(model=model, prompt="still there?", max_tokens=2)
                    assert answer.choices[0].text
                    served += 1
                    time.sleep(0.5)
                cp = api.get(f"/api/control-planes/{control_plane['id']}/").json()
                assert cp["sync_state"] == "failed"
                assert "unreachable" in cp["last_sync_error"]
                now = sorted((n["id"], n["url"], n["state"], n["role"]) for n in nodes(api, control_plane["id"]))
                assert now == before
                print(f"\nNanoCtrl down 30 s: {served} requests served, nodes unchanged, control plane failed")
            finally:
                nanoctrl.start()
            wait_until(
                lambda: api.get(f"/api/control-planes/{control_plane['id']}/").json()["sync_state"] == "ok",
                20,
                "the sync never recovered",
            )
            after = sorted((n["id"], n["url"], n["state"], n["role"]) for n in nodes(api, control_plane["id"]))
            assert after == before  # same rows: no duplicates, nothing marked gone
            assert len(nanoctrl.entities(scope)) == 2
    finally:
        nanoctrl.stop()


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


def test_two_concurrent_sync_nodes_runs_one_syncs_the_other_skips(stack, scope) -> None:
    api = stack.api
    env = {**stack.env, "ROUTERPANEL_REGISTRY_TIMEOUT": "20"}
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


def test_scopes_are_isolated_and_manual_edits_survive_syncs(stack, control_plane, scope) -> None:
    api = stack.api
    other_scope = scope + "-other"
    with (
        run_simulator(engine="nanodeploy", served_model_name="mine", extra_args=engine_args(stack, scope)) as mine,
        run_simulator(
            engine="nanodeploy", served_model_name="theirs", extra_args=engine_args(stack, other_scope)
        ) as theirs,
    ):
        wait_until(lambda: node_at(api, mine.url), 5, "our own node was never created")
        wait_for_syncs(stack, control_plane["id"], 2)
        assert node_at(api, theirs.url) is None  # another scope's engine is not ours
        node = node_at(api, mine.url)
        assert api.patch(f"/api/nodes/{node['id']}/", json={"weight": 7, "state": "disabled"}).status_code == 200
        wait_for_syncs(stack, control_plane["id"], 3)
        cp = api.get(f"/api/control-planes/{control_plane['id']}/").json()
        assert cp["sync_state"] == "ok" and cp["last_sync_counts"]["listed"] == 1
        node = node_at(api, mine.url)
        assert (node["weight"], node["state"]) == (7, "disabled")


def chat_status(stack: RouterPanelStack, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    headers = {"Authorization": f"Bearer {stack.key}"}
    return httpx.post(stack.v1 + "/chat/completions", json=body, headers=headers, timeout=10).status_code


def test_with_manual_approval_a_registered_engine_waits_pending_until_approved(stack, control_plane, scope) -> None:
    api = stack.api
    assert api.patch(f"/api/control-planes/{control_plane['id']}/", json={"approval_mode": "manual"}).status_code == 200
    model = f"m-{scope}"
    with run_simulator(engine="nanodeploy", served_model_name=model, extra_args=engine_args(stack, scope)) as sim:
        node = wait_until(lambda: node_at(api, sim.url), 5, "no node created")
        assert (node["state"], node["source"]) == ("pending", "registry")
        assert model not in routable_models(stack)
        assert chat_status(stack, model) == 503
        wait_for_syncs(stack, control_plane["id"], 2)  # later syncs and events keep it pending
        assert node_at(api, sim.url)["state"] == "pending"
        assert sim.stats()["requests"]["by_endpoint"].get("/v1/chat/completions", 0) == 0

        assert api.post(f"/api/nodes/{node['id']}/approve/").status_code == 200
        took = timed(lambda: chat_status(stack, model) == 200, 5, "not served after the approval")
        print(f"\napproved registry node served {took:.2f} s after the approval")
        assert sim.stats()["requests"]["by_endpoint"]["/v1/chat/completions"] >= 1
        wait_for_syncs(stack, control_plane["id"], 2)
        assert node_at(api, sim.url)["state"] == "active"


def test_an_engine_outside_the_allowed_networks_is_refused_and_counted(stack, control_plane, scope) -> None:
    api = stack.api
    path = f"/api/control-planes/{control_plane['id']}/"
    assert api.patch(path, json={"allowed_networks": ["10.0.0.0/8"]}).status_code == 200
    with run_simulator(
        engine="nanodeploy", served_model_name=f"m-{scope}", extra_args=engine_args(stack, scope)
    ) as sim:
        wait_until(
            lambda: api.get(path).json()["last_sync_counts"].get("refused") == 1,
            15,
            "never refused by a sync",
            interval=0.1,
        )
        # The scheduled sync may hold the lock (409): ask again until this one runs.
        answer = wait_until(
            lambda: (r := api.post(path + "sync/")).status_code != 409 and r,
            10,
            "the sync lock was never free",
            interval=0.2,
        )
        result = answer.json()
        assert (result["listed"], result["refused"], result["created"]) == (1, 1, 0)
        assert "outside the allowed networks" in " ".join(result["problems"])
        assert node_at(api, sim.url) is None


@pytest.mark.slow
def test_a_killed_engine_stays_listed_until_its_60_s_ttl_then_is_marked_gone_after_one_sync(
    killed_engine: KilledEngine | None,
) -> None:
    """A SIGKILLed engine does not unregister: NanoCtrl lists it until its 60 s TTL expires (which
    publishes no event), and only the next periodic sync marks the node gone. The engine was killed
    when the module started (``killed_engine``); this test, the module's last, waits for what is
    left of the minute. It also holds the NanoCtrl half, the simulator's registration protocol
    (tests/enginesim/test_registration.py), so that `make test` waits for the TTL once."""
    assert killed_engine is not None
    assert killed_engine.listed_after_kill  # no unregister: only the TTL can remove it
    wait_until(
        lambda: killed_engine.gone_after is not None,
        max(0.0, 90 - (time.monotonic() - killed_engine.killed_at)),
        "the killed engine's node was never marked gone",
        interval=0.5,
    )
    expired, took = killed_engine.expired_after, killed_engine.gone_after
    print(f"\nSIGKILLed engine: expired from NanoCtrl after {expired:.1f} s, marked gone after {took:.1f} s")
    assert expired is not None and expired > 30
    assert 50 < took < 60 + 2 * SYNC_INTERVAL + 10
