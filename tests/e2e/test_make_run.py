"""`make run` itself, on free ports and a fresh database, as it would run on a developer's LAN: no
Django debug page for anyone (a 33 MiB login POST, a 404, a crash), a secret key generated once
into a file only its owner reads, static files and the API docs served from the project, a
Content-Security-Policy on the pages, and JSON errors under ``/api/`` and ``/nodes/`` for every
status (404, 405, 413, 500) while the rest keeps Django's HTML error pages."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port_block
from tests.support.procs import REPO_ROOT, wait_for_port
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

TOKEN = "e2e8888888888888888888888888888888888888"
PASSWORD = "e2e-admin-password"
BIG = 33 * 1024 * 1024
# What Django's debug pages show and an error page must never: settings, paths, tracebacks, URL patterns.
LEAKS = ("Traceback", "DATABASES", "SECRET_KEY", "sqlite3", "redis://", "URLconf", "urlpatterns", "settings.py")


@pytest.fixture(scope="module")
def make_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`make run` (its `install` step taken as done) on free ports; yields the base URL and paths."""
    tmp = tmp_path_factory.mktemp("make-run")
    base = free_port_block(7)  # the web server, Redis, NanoCtrl and the four demo engines
    port, redis_port, nanoctrl_port, engines = base, base + 1, base + 2, base + 3
    env = {name: value for name, value in os.environ.items() if not name.startswith("ROUTERPANEL_")}
    env.pop("DATABASE_URL", None)
    env.update(
        ROUTERPANEL_SQLITE_PATH=str(tmp / "db.sqlite3"),
        ROUTERPANEL_STATIC_ROOT=str(tmp / "static"),
        ROUTERPANEL_SECRET_KEY_FILE=str(tmp / "var" / "secret_key"),
        ROUTERPANEL_ADMIN_PASSWORD=PASSWORD,
        ROUTERPANEL_API_TOKEN=TOKEN,
        ROUTERPANEL_DEMO_API_KEY="rp-e2e-make-run-key",
        ROUTERPANEL_LOG_LEVEL="WARNING",
    )
    argv = ["make", "-o", ".venv/.installed", "run", "HOST=127.0.0.1", f"PORT={port}", f"REDIS_PORT={redis_port}"]
    argv += [f"NANOCTRL_PORT={nanoctrl_port}", f"ENGINE_BASE_PORT={engines}"]
    log = tmp / "make-run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        try:
            wait_for_port(port, proc=proc, timeout=180)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{log.read_text(errors='replace')[-4000:]}") from None
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(base + "/health", timeout=5).status_code == 200, 60, "/health never said 200")
        yield {"base": base, "database": str(tmp / "db.sqlite3"), "secret": str(tmp / "var" / "secret_key")}
    finally:
        # make, honcho and every process honcho started share make's process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        try:
            wait_until(lambda: not group_alive(proc.pid), 20, "make's process group outlived SIGTERM", interval=0.1)
        except AssertionError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def login(client: httpx.Client, base: str) -> None:
    client.get("/admin/login/")
    data = {"username": "admin", "password": PASSWORD, "csrfmiddlewaretoken": client.cookies["csrftoken"]}
    answer = client.post("/admin/login/", data=data, headers={"Referer": f"{base}/admin/login/"})
    assert answer.status_code == 302, answer.text[:500]


def assert_no_debug_page(response: httpx.Response) -> None:
    leaked = [word for word in LEAKS if word in response.text]
    assert not leaked, f"{response.status_code} leaks {leaked}: {response.text[:300]}"


def test_it_generates_a_secret_key_only_its_owner_reads(make_run: dict[str, str]) -> None:
    secret = Path(make_run["secret"])
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(secret.read_text().strip()) >= 50


def test_no_debug_page_for_a_huge_login_post_a_404_or_a_crash(make_run: dict[str, str]) -> None:
    base = make_run["base"]
    started = time.monotonic()
    huge = httpx.post(base + "/admin/login/", content=b"username=" + b"x" * BIG, timeout=60)
    assert huge.status_code == 413, huge.text[:300]
    assert time.monotonic() - started < 20
    assert_no_debug_page(huge)
    missing = httpx.get(base + "/no-such-page/", timeout=10)
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("text/html")
    assert_no_debug_page(missing)


def test_the_apis_answer_json_for_every_error_status(make_run: dict[str, str]) -> None:
    base = make_run["base"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    answers = {
        "404 /api": httpx.get(base + "/api/no-such-thing/", headers=auth),
        "405 /api": httpx.put(base + "/api/nodes/", headers=auth, json={}),
        "413 /api": httpx.post(base + "/api/nodes/", headers=auth, content=b"{" + b" " * BIG + b"}", timeout=60),
        "404 /nodes": httpx.get(base + "/nodes/no-such-thing", headers=auth),
        "405 /nodes": httpx.get(base + "/nodes/add", headers=auth),
        "413 /nodes": httpx.post(base + "/nodes/add", headers=auth, content=b"{" + b" " * BIG + b"}", timeout=60),
    }
    for name, response in answers.items():
        assert response.status_code == int(name[:3]), (name, response.status_code, response.text[:200])
        assert response.headers["content-type"].startswith("application/json"), (name, response.text[:200])
        assert response.json(), name
        assert_no_debug_page(response)


def test_static_files_and_the_api_docs_come_from_the_project_under_a_content_security_policy(
    make_run: dict[str, str],
) -> None:
    base = make_run["base"]
    with httpx.Client(base_url=base, timeout=10) as client:
        page = client.get("/admin/login/")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        css = re.search(r'href="(/static/admin/css/[^"]+\.css)"', page.text)
        assert css is not None and client.get(css.group(1)).status_code == 200
        login(client, base)
        dashboard = client.get("/dashboard/")
        assert dashboard.status_code == 200
        assert "script-src 'self'" in dashboard.headers["content-security-policy"]
        docs = client.get("/api/docs/")
        assert docs.status_code == 200
        assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
        assert assets and all(a.startswith("/") for a in assets), assets  # nothing from another origin
        for asset in assets:
            assert client.get(asset).status_code == 200, asset


def test_a_crash_is_json_under_the_apis_and_a_plain_page_elsewhere(make_run: dict[str, str]) -> None:
    """The last test of the module: it breaks the database (a table is renamed away)."""
    base = make_run["base"]
    with contextlib.closing(sqlite3.connect(make_run["database"])) as db:
        db.execute("ALTER TABLE nodes_routepolicy RENAME TO broken_routepolicy")
        db.execute("ALTER TABLE nodes_node RENAME TO broken_node")
        db.commit()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    api = httpx.get(base + "/api/route-policies/", headers=auth, timeout=10)
    compat = httpx.get(base + "/nodes/status", headers=auth, timeout=10)
    for response in (api, compat):
        assert response.status_code == 500
        assert response.headers["content-type"].startswith("application/json"), response.text[:200]
        assert_no_debug_page(response)
    with httpx.Client(base_url=base, timeout=10) as client:
        login(client, base)
        page = client.get("/admin/nodes/routepolicy/")
        assert page.status_code == 500
        assert page.headers["content-type"].startswith("text/html")
        assert_no_debug_page(page)
