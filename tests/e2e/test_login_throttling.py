"""Guessing passwords or REST API tokens is throttled (django-axes, per client address), through a
real web process: after 30 wrong passwords the right one is refused too, until the cool-off
(shortened to a few seconds here; 15 minutes by default) has passed; the same for tokens."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.matrix import Matrix
from tests.support.stack import ADMIN_PASSWORD as PASSWORD
from tests.support.stack import TOKEN, StackPool, StackSpec

# Long enough for the tries after the lockout and the right one to land inside it on a loaded
# machine: `make test` runs the suite on several processes, and at a load of 12 on two cores the 21
# REST tries after the lockout took 10 s (they outlasted cool-offs of 4 s and 10 s).
COOLOFF = 20.0
TRIES = 30
# A stack of its own: the lockout covers every client on 127.0.0.1 until the cool-off has passed.
THROTTLED_STACK = StackSpec(settings={"ROUTERPANEL_LOGIN_COOLOFF": str(COOLOFF)})
pytestmark = [pytest.mark.e2e, pytest.mark.stack(THROTTLED_STACK)]

MATRIX = Matrix("login and token guessing (tests/e2e/test_login_throttling.py)")


@pytest.fixture(scope="module", autouse=True)
def _print_matrix() -> Iterator[None]:
    yield
    MATRIX.print()


@pytest.fixture(scope="module")
def base(stacks: StackPool) -> str:
    return stacks.get(THROTTLED_STACK).base


def log_in(client: httpx.Client, base: str, password: str) -> int:
    """One try of the admin's login form; 302 means logged in."""
    client.get("/admin/login/")
    csrf = client.cookies.get("csrftoken", "")
    data = {"username": "admin", "password": password, "csrfmiddlewaretoken": csrf}
    return client.post("/admin/login/", data=data, headers={"Referer": f"{base}/admin/login/"}).status_code


def test_thirty_wrong_passwords_lock_the_admin_login_until_the_cool_off(base: str) -> None:
    with httpx.Client(base_url=base, timeout=10) as client:
        wrong = [log_in(client, base, f"guess-{i}") for i in range(TRIES)]
        right = log_in(client, base, PASSWORD)
        last_try = time.monotonic()
    assert set(wrong) <= {200, 429}, wrong  # the form again, then the lockout
    assert right == 429
    MATRIX.add(
        f"{TRIES} wrong admin passwords, then the right one",
        TRIES + 1,
        f"wrong: {sorted(set(wrong))}; the right one: {right}",
        ok=right == 429,
    )
    time.sleep(max(0.0, last_try + COOLOFF + 0.5 - time.monotonic()))  # the cool-off is what is tested
    with httpx.Client(base_url=base, timeout=10) as client:
        after = log_in(client, base, PASSWORD)
    MATRIX.add("the right password after the cool-off", 1, f"{after}", ok=after == 302)
    assert after == 302


def test_thirty_wrong_rest_tokens_lock_the_api_until_the_cool_off(base: str) -> None:
    wrong = [
        httpx.get(base + "/api/nodes/", headers={"Authorization": f"Bearer wrong-token-{i:04d}"}).status_code
        for i in range(TRIES)
    ]
    right = httpx.get(base + "/api/nodes/", headers={"Authorization": f"Bearer {TOKEN}"})
    last_try = time.monotonic()
    assert set(wrong) <= {401, 429}, wrong
    assert 429 in wrong
    assert right.status_code == 429, right.text
    assert "Retry-After" in right.headers or right.json()
    MATRIX.add(
        f"{TRIES} wrong REST API tokens, then the right one",
        TRIES + 1,
        f"wrong: {sorted(set(wrong))}; the right one: {right.status_code}",
        ok=right.status_code == 429,
    )
    time.sleep(max(0.0, last_try + COOLOFF + 0.5 - time.monotonic()))  # the cool-off is what is tested
    after = httpx.get(base + "/api/nodes/", headers={"Authorization": f"Bearer {TOKEN}"})
    MATRIX.add("the right token after the cool-off", 1, f"{after.status_code}", ok=after.status_code == 200)
    assert after.status_code == 200
