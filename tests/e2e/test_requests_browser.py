"""The Requests page in a real browser (Playwright driving Debian's chromium, headless): an operator
finds a failed request and reads why it failed and which nodes were skipped and why.

RouterPanel runs for real (the e2e ``stack``) in front of a simulated engine that answers 503, a node
nobody listens on, a drained node and a disabled one. Screenshots go to ``tests/artifacts/``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from enginesim.testing import run_simulator
from tests.e2e import test_dashboard_browser as browser
from tests.support.ports import closed_port

pytestmark = pytest.mark.e2e

OTHER = "other-model"


@pytest.fixture
def page(stack) -> Iterator:
    """A fresh headless chromium page on RouterPanel's origin; fails on any JavaScript error."""
    sync_playwright = browser._browser_or_skip()
    browser.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=browser.CHROMIUM, headless=True, args=browser.CHROMIUM_ARGS
        )
        try:
            context = chromium.new_context(base_url=stack.base, viewport={"width": 1400, "height": 1000})
            context.set_default_timeout(browser.TIMEOUT_MS)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page
            assert errors == [], f"JavaScript errors on the page: {errors}"
        finally:
            chromium.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(browser.ARTIFACTS / f"requests-{name}.png"), full_page=True)


def log_in(page, next_path: str) -> None:
    page.goto(f"/admin/login/?next={next_path}")
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(browser.ADMIN_PASSWORD)
    page.get_by_label("Password").press("Enter")
    page.wait_for_url(f"**{next_path}")


def post(stack, model: str, request_id: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    headers = {"Authorization": f"Bearer {stack.key}", "X-Request-Id": request_id}
    return httpx.post(stack.v1 + "/chat/completions", json=body, headers=headers, timeout=30)


def test_an_operator_finds_a_failed_request_and_reads_why(page, stack) -> None:
    from playwright.sync_api import expect

    model = f"explained-{uuid.uuid4().hex[:6]}"  # the store outlives the test: its records are this run's only
    with (
        run_simulator(served_model_name=model) as busy,
        run_simulator(served_model_name=OTHER) as fine,
        run_simulator(served_model_name=model) as doomed,
    ):
        stack.add_node(busy.url, [model], engine_type="openai", name="busy-engine", settle=False)
        # Probed healthy when it is added (a node never probed takes no traffic), then gone: this
        # stack runs no prober, so it stays in rotation and a request meets a refused connection.
        stack.add_node(doomed.url, [model], engine_type="openai", name="dead-engine", settle=False)
        for name, port, action in (
            ("drained-engine", closed_port(1), "drain"),
            ("disabled-engine", closed_port(2), "disable"),
        ):
            node = stack.add_node(f"http://127.0.0.1:{port}", [model], engine_type="openai", name=name, settle=False)
            assert stack.api.post(f"/api/nodes/{node['id']}/{action}/").status_code == 200
        stack.add_node(fine.url, [OTHER], engine_type="openai", name="fine-engine", settle=False)
        stack.settle()
        doomed.proc.kill()
        doomed.proc.wait()
        busy.set_faults(error_rate=1.0, error_status=503)  # "overloaded": the proxy tries another node

        for _ in range(3):
            assert post(stack, OTHER, f"ok-{uuid.uuid4().hex[:8]}").status_code == 200
        failed_id = f"failed-{uuid.uuid4().hex[:8]}"
        failed = post(stack, model, failed_id)
        assert failed.status_code == 503, failed.text  # both nodes tried: the engine's own 503 is the answer

        # The operator starts from the dashboard and follows its link to the Requests page.
        log_in(page, "/dashboard/")
        page.get_by_role("link", name="Requests: why each went where it went").click()
        page.wait_for_url("**/dashboard/requests/")
        expect(page.locator("#rp-connection")).to_have_attribute("data-state", "live")
        rows = page.locator("#rp-requests tbody tr")
        # The web worker flushes its explanations about once a second: the live tail brings them.
        expect(page.locator(f'#rp-requests tbody tr[data-request-id="{failed_id}"]')).to_have_count(1)
        shot(page, "1-list")

        # Only the failures of that model.
        page.get_by_label("Model").select_option(model)
        page.get_by_label("Status").fill("error")
        page.get_by_role("button", name="Filter").click()
        page.wait_for_url("**/dashboard/requests/?*status=error*")
        expect(rows).to_have_count(1)
        row = rows.first
        expect(row).to_have_attribute("data-request-id", failed_id)
        expect(row.locator('[data-field="status"]')).to_contain_text("503")
        expect(row.locator('[data-field="retries"]')).to_have_text("1")
        expect(row.locator('[data-field="left_out"]')).to_contain_text("draining 1")
        expect(row.locator('[data-field="left_out"]')).to_contain_text("disabled 1")
        shot(page, "2-filtered")

        # Its record: why it failed, which nodes were tried and which were skipped, and why.
        row.get_by_role("button", name=failed_id).click()
        detail = page.locator("#rp-detail")
        expect(detail).to_be_visible()
        expect(page.locator("#rp-detail-heading")).to_have_text(f"Request {failed_id}")
        expect(page.locator("#rp-detail-heading")).to_be_focused()
        expect(detail.locator('[data-field="outcome"]')).to_contain_text("Failed after 2 attempts, 1 retry")
        attempts = detail.locator("#rp-attempts tbody tr")
        expect(attempts).to_have_count(2)
        by_node = {attempts.nth(i).locator("td").nth(1).inner_text(): attempts.nth(i).inner_text() for i in range(2)}
        assert "503" in next(text for node, text in by_node.items() if node.startswith("busy-engine"))
        assert "engine_unreachable" in next(text for node, text in by_node.items() if node.startswith("dead-engine"))
        expect(attempts.nth(1)).to_contain_text("the previous node")  # the retry says why it happened
        first_choice = detail.locator('.rp-choice[data-index="0"]')
        expect(first_choice.locator('li[data-reason="draining"]')).to_contain_text("drained-engine")
        expect(first_choice.locator('li[data-reason="disabled"]')).to_contain_text("disabled-engine")
        expect(first_choice.locator('li[data-reason="draining"] .rp-badge')).to_have_text("Draining")
        second_choice = detail.locator('.rp-choice[data-index="1"]')
        expect(second_choice.locator('li[data-reason="tried"]')).to_contain_text("Already tried")
        expect(detail.locator(".rp-facts")).to_contain_text("Round robin")
        shot(page, "3-why-it-failed")

        # The record has its own address: a reload (or a colleague given the link) opens it again.
        assert f"request={failed_id}" in page.url
        page.reload()
        expect(page.locator("#rp-detail-heading")).to_have_text(f"Request {failed_id}")

        # With no filter the page follows new requests live, without a reload.
        page.goto("/dashboard/requests/")
        page.evaluate("window.__loadMarker = 'no reload'")
        expect(page.locator("#rp-connection")).to_have_attribute("data-state", "live")
        new_id = f"new-{uuid.uuid4().hex[:8]}"
        assert post(stack, OTHER, new_id).status_code == 200
        expect(rows.first).to_have_attribute("data-request-id", new_id)
        assert page.evaluate("window.__loadMarker") == "no reload"
        shot(page, "4-live-tail")


def test_the_requests_page_passes_an_accessibility_audit(page, stack) -> None:
    """axe-core's WCAG 2 A and AA rules on the page's own content, with a request's record open."""
    from playwright.sync_api import expect

    with run_simulator(served_model_name=OTHER) as fine:
        stack.add_live_node(fine.url, [OTHER], engine_type="openai", name="fine-engine")
        request_id = f"a11y-{uuid.uuid4().hex[:8]}"
        assert post(stack, OTHER, request_id).status_code == 200
        log_in(page, "/dashboard/requests/")
        expect(page.locator(f'#rp-requests tbody tr[data-request-id="{request_id}"]')).to_have_count(1)
        page.get_by_role("button", name=request_id).click()
        expect(page.locator("#rp-detail")).to_be_visible()
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)
            page.evaluate(browser.SETTLED)  # the admin's 0.15 s colour transition has finished
            # From the page's own origin (the Content-Security-Policy refuses inline scripts).
            page.route(
                "**/__axe.min.js", lambda route: route.fulfill(path=str(browser.AXE), content_type="text/javascript")
            )
            page.add_script_tag(url="/__axe.min.js")
            result = page.evaluate(
                """() => axe.run({include: [["#content-main"]]},
                                 {runOnly: {type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}})"""
            )
            problems = [
                f"{v['id']}: {v['help']} ({[n['target'] for n in v['nodes']][:3]})" for v in result["violations"]
            ]
            shot(page, f"5-accessibility-{scheme}")
            assert problems == [], f"{scheme} theme: {problems}"
