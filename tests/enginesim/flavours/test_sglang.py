"""SGLang bootstrap dual dispatch: both legs must meet in the same room(s) in time, or both fail."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import httpx
import pytest

from enginesim import expected_completion
from enginesim.testing import Simulator, free_port, run_simulator
from tests.support.wait import wait_until_async


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Simulator, Simulator, int]]:
    """A prefill (with its bootstrap server) and a decode; both give up on a room after 3 s."""
    bootstrap_port = free_port()
    timeout = "--pd-timeout-s=3"
    with (
        run_simulator(engine="sglang", role="prefill", extra_args=[f"--bootstrap-port={bootstrap_port}", timeout]) as p,
        run_simulator(engine="sglang", role="decode", extra_args=[timeout]) as d,
    ):
        yield p, d, bootstrap_port


@pytest.fixture(autouse=True)
def _reset(pair) -> None:
    for sim in pair[:2]:
        sim.reset()


def room() -> int:
    return random.getrandbits(63)


def pd_body(bootstrap_port: int, rooms, prompt="[[len=6]] hi", **fields) -> dict:
    body = {"model": "sim-model", "prompt": prompt, "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap_port}
    return {**body, "bootstrap_room": rooms, **fields}


async def post(sim: Simulator, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(timeout=20) as client:
        return await client.post(sim.url + "/v1/completions", json=body)


async def test_both_legs_with_the_same_room_succeed_and_the_decode_answers_in_full(pair):
    prefill, decode, port = pair
    body = pd_body(port, room(), max_tokens=4)
    p, d = await asyncio.gather(post(prefill, body), post(decode, body))
    assert (p.status_code, d.status_code) == (200, 200)
    assert d.json()["choices"][0]["text"] == expected_completion("[[len=6]] hi", 4)
    assert prefill.stats()["pd"]["rooms_ok"] == 1 and decode.stats()["pd"]["rooms_ok"] == 1


async def test_the_decode_may_arrive_before_the_prefill(pair):
    prefill, decode, port = pair
    body = pd_body(port, room())
    decode_leg = asyncio.ensure_future(post(decode, body))
    await wait_until_async(
        lambda: asyncio.to_thread(lambda: decode.stats()["requests"]["in_flight"] == 1), 5, "the decode never arrived"
    )
    p, d = await asyncio.gather(post(prefill, body), decode_leg)
    assert (p.status_code, d.status_code) == (200, 200)


async def test_a_prefill_whose_decode_never_comes_fails_after_the_timeout(pair):
    prefill, _, port = pair
    response = await post(prefill, pd_body(port, room()))
    assert response.status_code == 500
    assert "bootstrap timeout" in response.json()["message"]
    stats = prefill.stats()["pd"]
    assert (stats["rooms_failed"], stats["rooms_waiting"]) == (1, 0)


async def test_a_decode_whose_prefill_never_comes_fails_after_the_timeout(pair):
    _, decode, port = pair
    response = await post(decode, pd_body(port, room()))
    assert response.status_code == 500
    assert "bootstrap failed" in response.json()["message"]


async def test_legs_with_different_rooms_both_fail(pair):
    prefill, decode, port = pair
    p, d = await asyncio.gather(post(prefill, pd_body(port, room())), post(decode, pd_body(port, room())))
    assert (p.status_code, d.status_code) == (500, 500)


async def test_a_wrong_bootstrap_port_fails_both_legs(pair):
    prefill, decode, _ = pair
    body = pd_body(free_port(), room())
    p, d = await asyncio.gather(post(prefill, body), post(decode, body))
    assert p.status_code >= 400 and d.status_code == 500


async def test_a_batch_of_prompts_uses_one_room_per_prompt(pair):
    prefill, decode, port = pair
    body = pd_body(port, [room(), room()], prompt=["[[len=3]] a", "[[len=3]] b"])
    p, d = await asyncio.gather(post(prefill, body), post(decode, body))
    assert (p.status_code, d.status_code) == (200, 200)
    texts = [c["text"] for c in d.json()["choices"]]
    assert texts == [expected_completion("[[len=3]] a"), expected_completion("[[len=3]] b")]
    assert prefill.stats()["pd"]["rooms_ok"] == 2


async def test_n_greater_than_one_uses_a_list_of_rooms(pair):
    prefill, decode, port = pair
    body = pd_body(port, [room(), room(), room()], n=3)
    p, d = await asyncio.gather(post(prefill, body), post(decode, body))
    assert (p.status_code, d.status_code) == (200, 200)
    assert len(d.json()["choices"]) == 3


async def test_one_int_room_serves_a_batch_with_n_as_sglang_derives_room_plus_i(pair):
    prefill, decode, port = pair
    body = pd_body(port, room(), prompt=["[[len=3]] a", "[[len=3]] b"], n=2)
    p, d = await asyncio.gather(post(prefill, body), post(decode, body))
    assert (p.status_code, d.status_code) == (200, 200)
    assert len(d.json()["choices"]) == 4 and prefill.stats()["pd"]["rooms_ok"] == 4


async def test_a_list_of_one_room_per_prompt_with_n_above_one_is_flagged(pair):
    prefill, _, port = pair
    # SGLang repeats a list n times: two rooms for two prompts with n=2 give each room twice.
    response = await post(prefill, pd_body(port, [room(), room()], prompt=["a", "b"], n=2))
    assert response.status_code == 400 and "repeat" in response.json()["message"]
    short = await post(prefill, pd_body(port, [room()], prompt=["a", "b", "c"]))
    assert short.status_code == 500  # SGLang indexes the list: an IndexError


@pytest.mark.parametrize(
    "fields",
    [
        {"bootstrap_room": "room-1"},
        {"bootstrap_room": 1.5},
        {"bootstrap_port": "port"},
        {"bootstrap_host": 5},
        {"bootstrap_room": [1, "x"]},
    ],
)
async def test_bootstrap_fields_of_the_wrong_type_get_sglangs_flat_400(pair, fields):
    prefill, decode, port = pair
    for sim in (prefill, decode):
        response = await post(sim, {**pd_body(port, room()), **fields})
        assert response.status_code == 400
        error = response.json()
        assert (error["object"], error["type"], error["code"]) == ("error", "Bad Request", 400)


async def test_the_prefill_needs_a_room_but_not_a_bootstrap_address(pair):
    prefill, decode, port = pair
    response = await post(prefill, {"model": "sim-model", "prompt": "x"})
    assert response.status_code == 400
    assert "without bootstrap room id" in response.json()["message"]
    # Only the decode uses the address: a prefill told another host still serves its room.
    body = pd_body(port, room())
    p, d = await asyncio.gather(post(prefill, {**body, "bootstrap_host": "10.255.0.1"}), post(decode, body))
    assert (p.status_code, d.status_code) == (200, 200)


async def test_a_decode_without_a_bootstrap_port_uses_its_own():
    bootstrap_port = free_port()
    args = [f"--bootstrap-port={bootstrap_port}", "--pd-timeout-s=3"]
    with (
        run_simulator(engine="sglang", role="prefill", extra_args=args) as prefill,
        run_simulator(engine="sglang", role="decode", extra_args=args) as decode,
    ):
        body = {"model": "sim-model", "prompt": "x", "bootstrap_host": "127.0.0.1", "bootstrap_room": room()}
        p, d = await asyncio.gather(post(prefill, body), post(decode, body))
        assert (p.status_code, d.status_code) == (200, 200)


async def test_pd_legs_without_bootstrap_fields_are_rejected(pair):
    prefill, decode, _ = pair
    body = {"model": "sim-model", "prompt": "x"}
    assert (await post(prefill, body)).status_code == 400
    assert (await post(decode, {**body, "bootstrap_room": 5})).status_code == 400


async def test_a_hybrid_sglang_engine_ignores_bootstrap_fields():
    with run_simulator(engine="sglang") as hybrid:
        response = await post(hybrid, {"model": "sim-model", "prompt": "x", "max_tokens": 2})
        assert response.json()["choices"][0]["text"] == expected_completion("x", 2)
