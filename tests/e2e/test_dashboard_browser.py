"""The operator's path in a real browser (Playwright driving Debian's chromium, headless).

RouterPanel runs for real: uvicorn, the prober (the active health checks), the test
Redis, and two simulated engines. The operator logs in, adds a node through the admin's form,
drains it with the admin action, opens the dashboard, and watches it update without a reload while
traffic flows through the proxy and while an engine is stopped. Screenshots of each step go to
``tests/artifacts/`` (git-ignored; CI keeps them as artifacts).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from enginesim.testing import run_simulator
from tests.support.ports import closed_port
from tests.support.procs import REPO_ROOT
from tests.support.stack import ADMIN_PASSWORD, RouterPanelStack, StackSpec
from tests.support.wait import wait_until

# The prober for the health checks, probing every second: a stopped engine turns unhealthy within
# about two seconds, as the page's waits expect; an opened breaker stays open long enough for a
# slow CI machine to see it on the page.
STACK = StackSpec(
    prober=True,
    settings={
        "ROUTERPANEL_BREAKER_COOLDOWN": "60",
        "ROUTERPANEL_HEALTH_INTERVAL": "1",
        "ROUTERPANEL_HEALTH_TIMEOUT": "0.5",
    },
)
pytestmark = [pytest.mark.e2e, pytest.mark.stack(STACK)]

CHROMIUM = os.environ.get("ROUTERPANEL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
MODEL = "dash-model"
AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
# Resolves once every CSS transition and animation running on the page has finished.
SETTLED = "() => Promise.all(document.getAnimations().map((a) => a.finished))"
# Generous: CI machines have 2 cores and run chromium, uvicorn, the prober and engines at once.
TIMEOUT_MS = 30_000


def _browser_or_skip():
    """Playwright and chromium, or a skip with the reason (a failure on CI, where both must exist)."""
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem, sync_playwright = "the playwright package is not installed (pip install -e '.[test]')", None
    if problem is None and not (shutil.which(CHROMIUM) or os.path.exists(CHROMIUM)):
        problem = f"{CHROMIUM} is missing (apt-get install chromium)"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    return sync_playwright


@pytest.fixture
def page(stack: RouterPanelStack) -> Iterator:
    """A fresh browser page (chromium, headless) on RouterPanel's origin."""
    sync_playwright = _browser_or_skip()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(base_url=stack.base, viewport={"width": 1400, "height": 1000})
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # Chromium reports what the Content-Security-Policy blocked on the console.
            page.on(
                "console",
                lambda message: errors.append(message.text) if "Content Security Policy" in message.text else None,
            )
            yield page
            assert errors == [], f"JavaScript errors or Content-Security-Policy violations on the page: {errors}"
        finally:
            browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def row(page, url: str):
    return page.locator("#rp-nodes tbody tr", has=page.locator(f'a:text-is("{url}")'))


def test_an_operator_adds_drains_and_watches_nodes_live(page, stack: RouterPanelStack) -> None:
    from playwright.sync_api import expect

    base, api = stack.base, stack.api
    engine = {"engine": "nanodeploy", "served_model_name": MODEL, "ttft_ms": 1.0, "itl_ms": 1.0}
    with run_simulator(**engine) as drained_engine, run_simulator(**engine) as busy_engine:
        # Log in.
        page.goto("/admin/login/?next=/admin/")
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill(ADMIN_PASSWORD)
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("heading", name="Fleet administration")).to_be_visible()

        # Add a node through the admin's real form, with the model it serves in the alias inline.
        page.goto("/admin/nodes/node/add/")
        page.get_by_label("Url").fill(drained_engine.url)
        page.get_by_label("Name").fill("engine-a")
        page.get_by_text("Add another Model alias").click()
        page.locator("#id_aliases-0-name").fill(MODEL)
        page.locator("#id_aliases-0-served_name").fill(MODEL)
        shot(page, "1-add-node")
        page.get_by_role("button", name="Save", exact=True).click()
        expect(page.locator(".messagelist")).to_contain_text("was added successfully")

        # Drain it with the admin action.
        page.goto("/admin/nodes/node/")
        node_row = page.locator("#result_list tbody tr", has=page.locator(f'a:text-is("{drained_engine.url}")'))
        node_row.locator("input.action-select").check()
        page.locator("select[name=action]").select_option("drain_nodes")
        page.get_by_role("button", name="Run").or_(page.get_by_role("button", name="Go")).first.click()
        expect(node_row).to_contain_text("Draining")
        shot(page, "2-drained")

        # A second node through the REST API, as automation would add it; it takes the traffic.
        added = api.post("/api/nodes/", json={"url": busy_engine.url, "models": [MODEL], "name": "engine-b"})
        assert added.status_code == 201, added.text
        busy_id = added.json()["id"]
        wait_until(lambda: api.get(f"/api/nodes/{busy_id}/").json()["health"] == "healthy", 30, "never healthy")
        stack.settle()  # the web worker routes by that health too (docs/decisions/0008-health-as-live-state.md)

        # The dashboard: both nodes, the drained one marked, live over the WebSocket.
        page.goto("/dashboard/")
        page.evaluate("window.__loadMarker = 'no reload'")
        expect(page.locator("#rp-connection")).to_have_attribute("data-state", "live")
        drained_row, busy_row = row(page, "engine-a"), row(page, "engine-b")
        expect(drained_row.locator('[data-field="state"]')).to_have_text("Draining")
        expect(busy_row.locator('[data-field="health"]')).to_have_text("Healthy")
        expect(page.locator(f'li[data-model="{MODEL}"]')).to_have_attribute("data-ready", "true")
        expect(busy_row.locator('[data-field="rps"]')).to_have_text("—")
        shot(page, "3-before-traffic")

        # Traffic through the proxy (a few seconds of it, for the chart): the busy node's numbers
        # move without a reload.
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {stack.key}"}, timeout=30) as proxy:
            started = time.monotonic()
            while (
                time.monotonic() - started < 4
                or busy_row.get_attribute("data-requests") in (None, "0")
                or busy_row.locator('[data-field="rps"]').inner_text() in ("—", "0.0")
            ):
                assert time.monotonic() - started < 60, "the dashboard never showed the traffic"
                for stream in (False, True):
                    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": stream}
                    response = proxy.post("/v1/completions", json=body)
                    assert response.status_code == 200, response.text
        expect(busy_row.locator('[data-field="p50_latency"]')).not_to_have_text("—")
        expect(busy_row.locator('[data-field="p50_ttft"]')).not_to_have_text("—")
        expect(busy_row.locator('[data-field="error_rate"]')).to_have_text("0.0 %")
        expect(busy_row.locator(".rp-spark canvas")).to_have_count(1)
        assert drained_row.get_attribute("data-requests") == "0", "a draining node took new requests"
        assert drained_engine.stats()["requests"]["by_endpoint"].get("/v1/completions", 0) == 0
        assert page.evaluate("window.__loadMarker") == "no reload"
        shot(page, "4-traffic")

        # Stop the busy engine: the health checker marks it unhealthy and the row follows, live.
        busy_engine.proc.kill()
        busy_engine.proc.wait()
        expect(busy_row.locator('[data-field="health"]')).to_have_text("Unhealthy", timeout=TIMEOUT_MS)
        expect(page.locator(f'li[data-model="{MODEL}"]')).to_have_attribute("data-ready", "false")
        expect(page.locator(f'li[data-model="{MODEL}"]')).to_contain_text("no healthy hybrid node")
        expect(page.locator("#rp-announcer")).to_contain_text("Unhealthy")
        assert page.evaluate("window.__loadMarker") == "no reload"
        shot(page, "5-engine-stopped")


def test_the_live_figures_add_up_over_every_web_worker(stack: RouterPanelStack) -> None:
    from nodes.live import keys, stats

    engine = {"engine": "nanodeploy", "served_model_name": "workers-model", "ttft_ms": 1.0, "itl_ms": 1.0}
    with stack.web(workers=2) as workers, run_simulator(**engine) as sim:
        node_id = stack.add_live_node(sim.url, ["workers-model"])["id"]  # settled: both new workers route it
        body = {"model": "workers-model", "prompt": "hi", "max_tokens": 2}
        served = 0
        headers = {"Authorization": f"Bearer {stack.key}"}
        with httpx.Client(base_url=workers, headers=headers, timeout=30) as proxy:
            for _ in range(200):
                # A new connection each time, so the kernel spreads them over both workers.
                response = proxy.post("/v1/completions", json=body, headers={"Connection": "close"})
                served += response.status_code == 200
                if served >= 60:
                    break
        assert served >= 60
        client = redis.Redis.from_url(stack.redis_url)
        live_workers = client.zrangebyscore(keys.WORKERS, time.time() - stats.SNAPSHOT_TTL, "+inf")
        assert len(live_workers) >= 3  # the module's server and these two workers
        figures: dict = {}
        with stack.admin_session() as dashboard:

            def all_counted() -> bool:
                nodes = dashboard.get("/dashboard/data").json()["nodes"]
                figures.update(next(n for n in nodes if n["id"] == node_id)["live"] or {})
                return figures.get("requests") == served

            wait_until(all_counted, 15, "the dashboard never counted every request")
        per_worker = [
            (snapshot["nodes"].get(str(node_id)) or {}).get("requests", 0)
            for snapshot in [json.loads(raw) for raw in client.mget(live_workers) if raw]
        ]
        print(f"\nrequests per web worker, as published: {sorted(per_worker, reverse=True)}; dashboard: {served}")
        assert figures["errors"] == 0
        assert figures["inflight"] == 0


def log_in(page, next_path: str) -> None:
    page.goto(f"/admin/login/?next={next_path}")
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(ADMIN_PASSWORD)
    page.get_by_label("Password").press("Enter")
    page.wait_for_url(f"**{next_path}")


def test_the_dashboard_charts_the_last_hours_tokens_per_model(page, stack: RouterPanelStack) -> None:
    from playwright.sync_api import expect

    with run_simulator(engine="vllm", served_model_name="chart-model") as sim:
        stack.add_live_node(sim.url, ["chart-model"], engine_type="vllm")
        headers = {"Authorization": f"Bearer {stack.key}"}
        body = {"model": "chart-model", "prompt": "count me", "max_tokens": 5}
        usage = [httpx.post(f"{stack.v1}/completions", json=body, headers=headers).json()["usage"] for _ in range(3)]
        tokens = sum(u["total_tokens"] for u in usage)
        with stack.admin_session() as admin:  # the web worker flushes its minutes about once a second

            def counted() -> bool:
                series = admin.get("/dashboard/usage").json()["series"]
                return any(s["model"] == "chart-model" and sum(s["tokens"]) >= tokens for s in series)

            wait_until(counted, 10, "the minutes never reached Redis")
        log_in(page, "/dashboard/")
        expect(page.locator("#rp-usage-chart canvas")).to_be_visible()
        expect(page.locator("#rp-usage-totals")).to_contain_text(f"chart-model: {tokens:,} tokens")
        shot(page, "usage")


def test_a_draining_node_shows_its_in_flight_requests_finish(page, stack: RouterPanelStack) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from playwright.sync_api import expect

    base, api = stack.base, stack.api
    # Streams of 200 tokens 25 ms apart: each request is in flight for about 5 s.
    slow = {"engine": "nanodeploy", "served_model_name": "slow-model", "ttft_ms": 1.0, "itl_ms": 25.0}
    with run_simulator(**slow, extra_args=["--natural-tokens=200"]) as sim:
        added = api.post("/api/nodes/", json={"url": sim.url, "models": ["slow-model"], "name": "slow-engine"})
        assert added.status_code == 201, added.text
        node_id = added.json()["id"]
        stack.settle()  # probed at once: routed, and by the health it was given
        log_in(page, "/dashboard/")
        slow_row = row(page, "slow-engine")
        expect(slow_row.locator('[data-field="state"]')).to_have_text("Active")

        def stream() -> tuple[int, bytes]:
            body = {"model": "slow-model", "prompt": "tell me a long story", "max_tokens": 500, "stream": True}
            headers = {"Authorization": f"Bearer {stack.key}"}
            with (
                httpx.Client(base_url=base, headers=headers, timeout=60) as client,
                client.stream("POST", "/v1/completions", json=body) as response,
            ):
                return response.status_code, response.read()

        with ThreadPoolExecutor(max_workers=3) as pool:
            wait_until(lambda: api.get(f"/api/nodes/{node_id}/").json()["state"] == "active", 30, "node never active")
            streams = [pool.submit(stream) for _ in range(3)]
            inflight = slow_row.locator('[data-field="inflight"]')
            expect(inflight).not_to_have_text("0", timeout=TIMEOUT_MS)
            drained = api.post(f"/api/nodes/{node_id}/drain/")
            assert drained.status_code == 200, drained.text
            expect(slow_row.locator('[data-field="state"]')).to_have_text("Draining")
            shot(page, "6-draining-with-requests-in-flight")
            results = [future.result(timeout=60) for future in streams]
        for status, body in results:
            assert status == 200
            assert body.rstrip().endswith(b"data: [DONE]"), body[-200:]  # finished, not cut off
        expect(inflight).to_have_text("0", timeout=TIMEOUT_MS)
        shot(page, "7-drained-in-flight-zero")
        late = httpx.post(
            f"{base}/v1/completions",
            json={"model": "slow-model", "prompt": "one more", "max_tokens": 2},
            headers={"Authorization": f"Bearer {stack.key}"},
            timeout=30,
        )
        assert late.status_code == 503, late.text  # a draining node takes no new request


def test_an_engine_answering_5xx_opens_its_breaker_on_the_dashboard(page, stack: RouterPanelStack) -> None:
    """Passive health next to active health: the engine's /health still says OK (so it stays
    healthy) while its 500s open the proxy's circuit breaker, which the dashboard shows."""
    from playwright.sync_api import expect

    base, api = stack.base, stack.api
    engine = {"engine": "nanodeploy", "served_model_name": "flaky-model", "ttft_ms": 1.0, "itl_ms": 1.0}
    with run_simulator(**engine) as sim:
        added = api.post("/api/nodes/", json={"url": sim.url, "models": ["flaky-model"], "name": "flaky-engine"})
        assert added.status_code == 201, added.text
        node_id = added.json()["id"]
        wait_until(lambda: api.get(f"/api/nodes/{node_id}/").json()["health"] == "healthy", 30, "never healthy")
        stack.settle()  # the web worker routes by that health too (docs/decisions/0008-health-as-live-state.md)
        log_in(page, "/dashboard/")
        flaky = row(page, "flaky-engine")
        card = page.locator('li[data-model="flaky-model"]')
        expect(flaky.locator('[data-field="breaker"]')).to_have_text("Closed")
        expect(card).to_have_attribute("data-ready", "true")

        sim.set_faults(error_rate=1.0, error_status=500)
        body = {"model": "flaky-model", "prompt": "hi", "max_tokens": 2}
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {stack.key}"}, timeout=30) as proxy:
            statuses = [proxy.post("/v1/completions", json=body).status_code for _ in range(8)]
        assert statuses[0] == 500 and statuses[-1] == 503, statuses  # the engine's 500s, then no routable node
        expect(flaky.locator('[data-field="breaker"]')).to_have_text("Open")
        expect(flaky.locator('[data-field="health"]')).to_have_text("Healthy")
        expect(flaky.locator('[data-field="error_rate"]')).to_have_text("100.0 %")
        expect(card).to_have_attribute("data-ready", "false")
        shot(page, "9-breaker-open")


def test_without_its_websocket_the_page_polls_and_stays_live(page) -> None:
    from playwright.sync_api import expect

    page.route_web_socket("**/ws/dashboard/", lambda socket: socket.close())  # a proxy that drops WebSockets
    log_in(page, "/dashboard/")
    expect(page.locator("#rp-connection")).to_have_attribute("data-state", "polling")
    updates = int(page.locator("body").get_attribute("data-updates") or 0)
    wait_until(
        lambda: int(page.locator("body").get_attribute("data-updates") or 0) >= updates + 2,
        15,
        "polling brought no updates",
        interval=0.1,
    )


def test_the_dashboard_is_for_staff_only(stack: RouterPanelStack) -> None:
    with httpx.Client(base_url=stack.base, timeout=10) as anonymous:
        for path in ("/dashboard/", "/dashboard/data"):
            response = anonymous.get(path)
            assert response.status_code == 302
            assert response.headers["location"].startswith("/admin/login/")


def test_the_dashboard_passes_an_accessibility_audit(page, stack: RouterPanelStack) -> None:
    """axe-core's WCAG 2 A and AA rules (labels, names, contrast, table headers, ARIA) on the
    dashboard's own content, in the light and the dark theme, with nodes, models and live figures."""
    from playwright.sync_api import expect

    engine = {"engine": "nanodeploy", "served_model_name": "a11y-model", "ttft_ms": 1.0, "itl_ms": 1.0}
    with run_simulator(**engine) as sim:
        stack.add_live_node(sim.url, ["a11y-model"], name="a11y-engine")  # settled: probed, healthy, routed
        body = {"model": "a11y-model", "prompt": "hi", "max_tokens": 2}
        with httpx.Client(base_url=stack.base, timeout=30) as proxy:
            for _ in range(20):
                proxy.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {stack.key}"})
        log_in(page, "/dashboard/")
        # The admin's links fade to a new theme's colours (a 0.15 s CSS transition): without
        # transitions the audit sees the theme's own colours, not a frame halfway between two.
        page.add_style_tag(content="*, *::before, *::after { transition: none !important; }")
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)
            expect(row(page, "a11y-engine").locator('[data-field="rps"]')).not_to_have_text("—")
            # The admin's links fade to the new theme's colours (a 0.15 s CSS transition): audit the
            # settled page, not a frame halfway between the themes.
            page.evaluate(SETTLED)
            # From the page's own origin (the Content-Security-Policy refuses inline scripts).
            page.route("**/__axe.min.js", lambda route: route.fulfill(path=str(AXE), content_type="text/javascript"))
            page.add_script_tag(url="/__axe.min.js")
            result = page.evaluate(
                """() => axe.run({include: [["#content-main"]]},
                                 {runOnly: {type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}})"""
            )
            problems = [
                f"{v['id']}: {v['help']} ({[n['target'] for n in v['nodes']][:3]})" for v in result["violations"]
            ]
            shot(page, f"8-accessibility-{scheme}")
            assert problems == [], f"{scheme} theme: {problems}"
            checked = {rule["id"] for rule in result["passes"]}
            assert {"color-contrast", "th-has-data-cells", "aria-allowed-attr"} <= checked, checked


def test_the_dashboard_can_be_used_with_the_keyboard(page) -> None:
    log_in(page, "/dashboard/")
    page.goto("/dashboard/")  # a fresh navigation: the tab order starts at the top of the page
    # The admin's "Skip to main content" link comes first, then the dashboard's own controls.
    for _ in range(5):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.className") == "skip-to-content-link":
            break
    assert page.evaluate("document.activeElement.className") == "skip-to-content-link"
    page.keyboard.press("Enter")
    focused: list[str] = []
    for _ in range(10):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id || document.activeElement.className || ''"))
        if "rp-scroll" in focused[-1]:
            break
    assert any("rp-scroll" in name for name in focused), f"the node table is not reachable by Tab: {focused}"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none", "the focused region shows no focus ring"


def test_the_admin_the_dashboard_and_the_api_docs_run_under_the_content_security_policy(
    page, stack: RouterPanelStack
) -> None:
    """Every page an operator opens, in a real browser, with the policy on (the ``page`` fixture
    fails on any violation Chromium reports): the admin's node list, change form (its scripts: the
    related-object popups, the date widgets) and add form, the dashboard live, and Swagger UI."""
    from playwright.sync_api import expect

    node = stack.add_node(f"http://127.0.0.1:{closed_port()}", ["csp-model"], name="csp-node")["id"]
    try:
        log_in(page, "/admin/nodes/node/")
        response = page.goto(f"/admin/nodes/node/{node}/change/")
        assert response is not None and "script-src 'self'" in response.headers["content-security-policy"]
        expect(page.locator("#node_form")).to_be_visible()
        page.get_by_role("button", name="Save and continue editing").click()
        expect(page.locator(".messagelist")).to_be_visible()
        page.goto("/admin/nodes/node/add/")
        expect(page.locator("#node_form")).to_be_visible()
        page.goto("/dashboard/")
        expect(page.locator("#rp-connection")).to_have_attribute("data-state", "live")
        expect(row(page, "csp-node")).to_be_visible()
        page.goto("/api/docs/")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("RouterPanel API")
        shot(page, "9-api-docs")
    finally:
        stack.api.delete(f"/api/nodes/{node}/")
