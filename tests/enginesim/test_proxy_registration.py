"""LMDeploy's ``--proxy-url`` self-registration as the simulator plays it (``enginesim/proxy_registration.py``):
the exact request LMDeploy's api_server sends, sent before the engine listens."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from enginesim.testing import run_simulator, simulator_argv
from tests.support.ports import free_port
from tests.support.procs import REPO_ROOT


@dataclass
class Router:
    """A stand-in router that records registrations and whether the engine listened meanwhile."""

    url: str = ""
    engine_port: int = 0
    status: int = 200
    seen: list[dict] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def router() -> Iterator[Router]:
    router = Router()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                with socket.create_connection(("127.0.0.1", router.engine_port), timeout=0.2):
                    listening = True
            except OSError:
                listening = False
            router.seen.append(
                {"path": self.path, "headers": dict(self.headers), "body": json.loads(body), "listening": listening}
            )
            answer = json.dumps("Added successfully").encode()
            self.send_response(router.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
            router.arrived.set()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    router.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield router
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("role", "value"), [("hybrid", 1), ("prefill", 2), ("decode", 3)])
def test_an_lmdeploy_engine_registers_once_as_lmdeploy_does_before_it_listens(router: Router, role, value) -> None:
    router.engine_port = free_port()
    proxy_url = f"{router.url}/register/rpr-token"
    with run_simulator(engine="lmdeploy", role=role, port=router.engine_port, extra_args=[f"--proxy-url={proxy_url}"]):
        assert router.arrived.wait(10)
    [seen] = router.seen
    assert seen["path"] == "/register/rpr-token/nodes/add"
    assert seen["body"] == {
        "url": f"http://127.0.0.1:{router.engine_port}",
        "status": {"models": ["sim-model"], "role": value},
    }
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert (headers["accept"], headers["content-type"]) == ("application/json", "application/json")
    assert "authorization" not in headers
    assert seen["listening"] is False


def test_a_refused_registration_is_logged_and_the_engine_serves_anyway(router: Router) -> None:
    router.status = 401
    router.engine_port = free_port()
    with run_simulator(engine="lmdeploy", port=router.engine_port, extra_args=[f"--proxy-url={router.url}"]) as sim:
        assert router.arrived.wait(10)
        assert httpx.get(sim.url + "/health", timeout=5).status_code == 200
        sim.proc.terminate()
        sim.proc.wait(10)
        assert "Service registration failed: HTTP 401" in sim.output()


def test_proxy_url_is_lmdeploys_option_only() -> None:
    argv = simulator_argv(engine="vllm", port=free_port(), extra_args=["--proxy-url=http://127.0.0.1:1"])
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "--proxy-url is LMDeploy's option" in done.stderr
