"""`make run`'s process set, for real: the Procfile under honcho (Redis, NanoCtrl, uvicorn, Celery
worker and beat, the registry listener, the prober, the demo fleet of simulated engines) on free
ports with a fresh database; then an operator's and an application's first steps over HTTP."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port_block
from tests.support.procs import PYTHON, REPO_ROOT, running
from tests.support.stack import inherited_environment
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

HONCHO = str(Path(PYTHON).parent / "honcho")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("stack")
    base = free_port_block(7)  # the web server, Redis, NanoCtrl and the four demo engines
    web_port, redis_port, nanoctrl_port, engine_base = base, base + 1, base + 2, base + 3
    env = {
        **inherited_environment(),
        "ROUTERPANEL_SQLITE_PATH": str(tmp / "db.sqlite3"),
        "ROUTERPANEL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "ROUTERPANEL_ADMIN_PASSWORD": "e2e-admin-password",
        "ROUTERPANEL_API_TOKEN": "e2e0000000000000000000000000000000000000",
        "ROUTERPANEL_DEMO_API_KEY": "rp-e2e-demo-key",
        "WEB_PORT": str(web_port),
        "REDIS_PORT": str(redis_port),
        "NANOCTRL_PORT": str(nanoctrl_port),
        "ENGINE_BASE_PORT": str(engine_base),
        "WEB_HOST": "127.0.0.1",
    }
    subprocess.run([PYTHON, "manage.py", "migrate", "--noinput", "-v0"], cwd=REPO_ROOT, env=env, check=True)
    boot = subprocess.run(
        [
            PYTHON,
            "manage.py",
            "bootstrap",
            f"--url=http://127.0.0.1:{web_port}",
            f"--control-plane=127.0.0.1:{nanoctrl_port}",
            f"--control-plane-redis=redis://127.0.0.1:{redis_port}/0",
        ],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    with running([HONCHO, "start", "-f", "Procfile"], port=web_port, env=env, timeout=60) as proc:
        yield {"base": f"http://127.0.0.1:{web_port}", "env": env, "bootstrap": boot.stdout, "proc": proc}


def test_bootstrap_uses_the_credentials_from_the_environment(stack) -> None:
    assert "e2e-admin-password" in stack["bootstrap"]
    assert stack["env"]["ROUTERPANEL_API_TOKEN"] in stack["bootstrap"]


def test_the_admin_login_works_and_its_styles_are_served(stack) -> None:
    with httpx.Client(base_url=stack["base"], timeout=10) as client:
        page = client.get("/admin/login/")
        assert page.status_code == 200
        css = re.search(r'href="(/static/admin/css/[^"]+\.css)"', page.text).group(1)
        assert client.get(css).status_code == 200
        token = client.cookies["csrftoken"]
        login = client.post(
            "/admin/login/?next=/admin/",
            data={"username": "admin", "password": "e2e-admin-password", "csrfmiddlewaretoken": token},
            headers={"Referer": f"{stack['base']}/admin/login/"},
        )
        assert login.status_code == 302
        assert client.get("/admin/").status_code == 200


def test_a_node_added_with_curl_shows_in_the_api_the_admin_and_the_audit(stack) -> None:
    token = stack["env"]["ROUTERPANEL_API_TOKEN"]
    # Exactly the README's curl: no Content-Type header.
    added = subprocess.run(
        [
            "curl",
            "-sS",
            "-H",
            f"Authorization: Bearer {token}",
            "-X",
            "POST",
            f"{stack['base']}/nodes/add",
            "-d",
            '{"url": "http://127.0.0.1:8100", "status": {"role": "prefill", "models": ["m"]}}',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert added.stdout == '{"message":"Added successfully."}'

    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=stack["base"], timeout=10, headers=auth) as client:
        # The demo fleet joins through NanoCtrl meanwhile (source "registry"): only the manual nodes.
        nodes = client.get("/api/nodes/?source=manual").json()["results"]
        assert [(n["url"], n["role"], n["served_models"]) for n in nodes] == [
            ("http://127.0.0.1:8100", "prefill", ["m"])
        ]
        changes = client.get("/api/changes/?object_type=node&via=compat").json()["results"]
        assert changes and changes[0]["actor_label"] == "admin"

    with httpx.Client(base_url=stack["base"], timeout=10) as browser:
        browser.get("/admin/login/")
        browser.post(
            "/admin/login/",
            data={
                "username": "admin",
                "password": "e2e-admin-password",
                "csrfmiddlewaretoken": browser.cookies["csrftoken"],
            },
            headers={"Referer": f"{stack['base']}/admin/login/"},
        )
        assert "http://127.0.0.1:8100" in browser.get("/admin/nodes/node/").text


def test_the_version_bump_reaches_the_stack_redis(stack) -> None:
    import redis

    client = redis.Redis.from_url(stack["env"]["ROUTERPANEL_REDIS_URL"])
    token = stack["env"]["ROUTERPANEL_API_TOKEN"]
    before = int(client.get("routerpanel:config:version") or 0)
    httpx.post(
        f"{stack['base']}/api/route-policies/",
        json={"model": "m-e2e", "strategy": "power_of_two"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    ).raise_for_status()
    wait_until(lambda: int(client.get("routerpanel:config:version") or 0) > before, 10, "the version never moved")


def test_the_celery_worker_answers(stack) -> None:
    celery = str(Path(PYTHON).parent / "celery")
    results: list[subprocess.CompletedProcess] = []

    def pong() -> bool:
        ping = [celery, "-A", "routerpanel", "inspect", "ping", "--timeout", "5"]
        results.append(subprocess.run(ping, cwd=REPO_ROOT, env=stack["env"], capture_output=True, text=True))
        return "pong" in results[-1].stdout

    wait_until(pong, 30, lambda: f"no pong: {results[-1].stdout}{results[-1].stderr}", interval=0.5)


def test_the_demo_fleet_registers_and_serves_through_the_proxy(stack) -> None:
    import openai

    token = stack["env"]["ROUTERPANEL_API_TOKEN"]
    auth = {"Authorization": f"Bearer {token}"}

    def registered() -> list[dict]:
        found = httpx.get(f"{stack['base']}/api/nodes/?source=registry", headers=auth, timeout=10).json()["results"]
        return found if len(found) == 4 else []

    nodes = wait_until(registered, 30, "the demo fleet never registered its four engines", interval=0.1)
    assert sorted((n["role"], n["served_models"][0]) for n in nodes) == [
        ("decode", "demo-pd"),
        ("hybrid", "demo-chat"),
        ("hybrid", "demo-chat"),
        ("prefill", "demo-pd"),
    ]
    client = openai.OpenAI(base_url=f"{stack['base']}/v1", api_key=stack["env"]["ROUTERPANEL_DEMO_API_KEY"])
    wait_until(lambda: "demo-chat" in {m.id for m in client.models.list().data}, 10, "demo-chat never routable")
    answer = client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hello"}])
    assert answer.choices[0].message.content
    # demo-pd has a prefill and a decode engine: served through prefill/decode disaggregation.
    pd = httpx.post(
        f"{stack['base']}/v1/chat/completions",
        json={"model": "demo-pd", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
        headers={"Authorization": f"Bearer {stack['env']['ROUTERPANEL_DEMO_API_KEY']}"},
        timeout=30,
    )
    assert pd.status_code == 200, pd.text
    assert pd.headers["x-routerpanel-node"].startswith("prefill=")
    assert pd.json()["choices"][0]["message"]["content"]
