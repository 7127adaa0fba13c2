"""Per-engine PD protocols (SPEC §4), registered by engine type.

Three engines hand the KV over in two stages (prefill, then decode with what the prefill returned):
NanoDeploy/DLEngine (``migration``, freed with ``/pd/free``), vLLM (NIXL ``kv_transfer_params``
under one ``X-Request-Id``; the decode's read frees it) and LMDeploy (``migration_request``, freed
with ``/distserve/free_cache``). SGLang dispatches both legs at once and the engines meet in a
bootstrap room. ``two_stage`` and ``dual_dispatch`` are the only places that sequence legs.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from typing import Any

import aiohttp

from nodes.choices import EngineType

from ..errors import ProxyError, engine_failed
from . import metrics as pd_metrics
from .core import Leg, LegAnswer, LegRequest, PdRequest, host_port, prefill_prompt_tokens, spawn

_STREAM_FIELDS = ("stream_options",)


class TwoStage:
    """Prefill, hand the KV over, decode, release. Subclasses say what each step sends."""

    engine_type = ""
    # True when the router must release the prefill's KV itself (vLLM's decode read releases it).
    frees_kv = True
    # Whether a decode that could not be reached, or (the second) answered 429/502/503, is retried
    # on another decode node while nothing has reached the client.
    decode_retries = True
    decode_retry_statuses = True

    def prefill_request(self, pd: PdRequest, leg: Leg) -> LegRequest:
        raise NotImplementedError

    def handoff(self, pd: PdRequest, answer: LegAnswer) -> dict[str, Any] | None:
        """What the decode needs from a successful prefill answer; None when the prefill already
        finished the request (EOS at prefill); ``ProxyError`` when the answer is unusable."""
        raise NotImplementedError

    def decode_request(self, pd: PdRequest, leg: Leg, handoff: dict[str, Any]) -> LegRequest:
        raise NotImplementedError

    def kv_key(self, answer: LegAnswer) -> Any | None:
        """The id of the KV a prefill answer holds on its node (None: nothing held)."""
        return None

    async def free(self, pd: PdRequest, leg: Leg, key: Any) -> None:
        raise NotImplementedError

    def decode_failed(self, pd: PdRequest) -> None:
        """The decode leg failed (after any retries): forget per-pair state that may be stale."""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class NanoDeploy(TwoStage):
    """NanoDeploy / DLEngine ``serve``: no ``max_tokens`` clamp (the engine stops after the first
    token and the budget must survive into the migrated sequence)."""

    engine_type = EngineType.NANODEPLOY

    def prefill_request(self, pd: PdRequest, leg: Leg) -> LegRequest:
        body = pd.payload_for(leg, drop=_STREAM_FIELDS, stream=False, kv_transfer_params={"do_remote_decode": True})
        return pd.request.path, body, leg.headers(pd.request.request_id)

    def handoff(self, pd: PdRequest, answer: LegAnswer) -> dict[str, Any] | None:
        data = answer.data or {}
        params = data.get("kv_transfer_params")
        if isinstance(params, dict) and params.get("migration"):
            if _int(params.get("seq_id")) is None:
                raise engine_failed(f"Prefill node {answer.leg.url} returned a migration without a seq_id.")
            return {k: params[k] for k in ("migration", "seq_id", "first_token") if k in params}
        if data.get("choices"):
            return None
        raise engine_failed(
            f"Prefill node {answer.leg.url} returned neither a migration nor a completion.", "prefill_failed"
        )

    def decode_request(self, pd: PdRequest, leg: Leg, handoff: dict[str, Any]) -> LegRequest:
        return pd.request.path, pd.payload_for(leg, kv_transfer_params=handoff), leg.headers(pd.request.request_id)

    def kv_key(self, answer: LegAnswer) -> Any | None:
        if answer.status != 200:
            return None
        params = (answer.data or {}).get("kv_transfer_params")
        return _int(params.get("seq_id")) if isinstance(params, dict) else None

    async def free(self, pd: PdRequest, leg: Leg, key: Any) -> None:
        await pd.free_kv(leg, "/pd/free", {"seq_ids": [key]}, lambda a: key in ((a.data or {}).get("freed") or ()))


class Vllm(TwoStage):
    """vLLM with a NIXL/P2P KV connector. The decode pulls the blocks, which releases them on the
    prefill; an abandoned transfer is released by vLLM itself after its abort timeout."""

    engine_type = EngineType.VLLM
    frees_kv = False
    # The request id names the decode; a decode that answered (even 503) is not swapped for another.
    decode_retry_statuses = False

    _PREFILL_KV = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }

    @staticmethod
    def _address(leg: Leg) -> str:
        node = leg.target.node
        if node.kv_connector_address:
            return node.kv_connector_address
        host, port = host_port(node)
        return f"{host}:{port}"

    def prefill_request(self, pd: PdRequest, leg: Leg) -> LegRequest:
        # Built per prefill attempt: P2P connectors read the addresses out of the id.
        assert pd.decode is not None
        pd.upstream_request_id = (
            f"___prefill_addr_{self._address(leg)}___decode_addr_{self._address(pd.decode)}_{uuid.uuid4().hex}"
        )
        changes: dict[str, Any] = {"stream": False, "max_tokens": 1, "min_tokens": 1}
        if "max_completion_tokens" in pd.request.payload:
            changes["max_completion_tokens"] = 1
        body = pd.payload_for(leg, drop=_STREAM_FIELDS, kv_transfer_params=dict(self._PREFILL_KV), **changes)
        return pd.request.path, body, leg.headers(pd.upstream_request_id)

    def handoff(self, pd: PdRequest, answer: LegAnswer) -> dict[str, Any] | None:
        params = (answer.data or {}).get("kv_transfer_params")
        if not isinstance(params, dict):
            raise engine_failed(
                f"Prefill node {answer.leg.url} returned no kv_transfer_params (is its KV connector configured?).",
                "prefill_failed",
            )
        return params

    def decode_request(self, pd: PdRequest, leg: Leg, handoff: dict[str, Any]) -> LegRequest:
        return pd.request.path, pd.payload_for(leg, kv_transfer_params=handoff), leg.headers(pd.upstream_request_id)


class Lmdeploy(TwoStage):
    """LMDeploy migration: one-token prefill that keeps its cache, decode with a ``migration_request``,
    then ``/distserve/free_cache``. The pair's p2p connection is set up once per process, as
    LMDeploy's proxy does (``p2p_initialize`` then ``p2p_connect`` on both engines)."""

    engine_type = EngineType.LMDEPLOY
    protocol = "RDMA"
    # Another decode node has no p2p link with this prefill: a migration to it would fail.
    decode_retries = False

    def __init__(self) -> None:
        self._connected: set[tuple[str, str]] = set()

    def prefill_request(self, pd: PdRequest, leg: Leg) -> LegRequest:
        changes: dict[str, Any] = {"stream": False, "max_tokens": 1, "with_cache": True, "preserve_cache": True}
        if "max_completion_tokens" in pd.request.payload:
            changes["max_completion_tokens"] = 1
        body = pd.payload_for(leg, drop=_STREAM_FIELDS, **changes)
        return pd.request.path, body, leg.headers(pd.request.request_id)

    async def connect(self, pd: PdRequest) -> None:
        assert pd.prefill is not None and pd.decode is not None
        pair = (pd.prefill.url, pd.decode.url)
        if pair in self._connected:
            return
        # Each engine initialises a link to the other, then connects with the other's endpoint info.
        sides = ((pd.prefill, pd.decode), (pd.decode, pd.prefill))
        endpoints: dict[str, Any] = {}
        for leg, peer in sides:
            init = {"protocol": self.protocol, "remote_engine_id": peer.url}
            endpoints[leg.url] = await self._handshake(pd, leg, "p2p_initialize", init)
        for leg, peer in sides:
            link = {
                "protocol": self.protocol,
                "remote_engine_id": peer.url,
                "remote_endpoint_info": endpoints[peer.url],
            }
            await self._handshake(pd, leg, "p2p_connect", link)
        self._connected.add(pair)

    @staticmethod
    async def _handshake(pd: PdRequest, leg: Leg, step: str, body: dict[str, Any]) -> Any:
        try:
            answer = await pd.post_json(leg, f"/distserve/{step}", body, {"Content-Type": "application/json"}, 30.0)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise engine_failed(f"LMDeploy {step} on {leg.url} failed: {exc}", "pd_connect_failed") from None
        if answer.status != 200:
            raise engine_failed(
                f"LMDeploy {step} on {leg.url} answered {answer.status}: {answer.message()}", "pd_connect_failed"
            )
        return answer.data

    def decode_failed(self, pd: PdRequest) -> None:
        # A restarted engine has lost its p2p links: connect the pair again on its next request.
        if pd.prefill is not None and pd.decode is not None:
            self._connected.discard((pd.prefill.url, pd.decode.url))

    def handoff(self, pd: PdRequest, answer: LegAnswer) -> dict[str, Any] | None:
        data = answer.data or {}
        session_id = self.kv_key(answer)
        blocks = data.get("cache_block_ids")
        tokens = data.get("remote_token_ids")
        if session_id is None or not isinstance(blocks, list) or not isinstance(tokens, list) or not tokens:
            raise engine_failed(
                f"Prefill node {answer.leg.url} returned no migratable cache (id, cache_block_ids, remote_token_ids).",
                "prefill_failed",
            )
        return {
            "protocol": self.protocol,
            "remote_engine_id": answer.leg.url,
            "remote_session_id": session_id,
            "remote_block_ids": blocks,
            "remote_token_id": tokens[-1],
        }

    def decode_request(self, pd: PdRequest, leg: Leg, handoff: dict[str, Any]) -> LegRequest:
        return pd.request.path, pd.payload_for(leg, migration_request=handoff), leg.headers(pd.request.request_id)

    def kv_key(self, answer: LegAnswer) -> Any | None:
        data = answer.data or {}
        if answer.status != 200 or "cache_block_ids" not in data:
            return None
        with contextlib.suppress(TypeError, ValueError):
            return int(data.get("id"))  # LMDeploy's response id is the session id
        return None

    async def free(self, pd: PdRequest, leg: Leg, key: Any) -> None:
        await pd.free_kv(leg, "/distserve/free_cache", {"session_id": key}, lambda a: bool((a.data or {}).get("freed")))


async def two_stage(pd: PdRequest, protocol: TwoStage) -> None:
    """Prefill → decode → release, with the release on every path after the prefill was sent.

    The prefill call runs as its own task awaited through ``shield``: a client that leaves while it
    is in flight cancels only our wait, and the clean-up task below lets the call finish (bounded by
    the prefill timeout) and releases the KV its answer names, which the engine would otherwise keep.
    """
    pd.choose_pair()
    if isinstance(protocol, Lmdeploy):
        try:
            await protocol.connect(pd)
        except BaseException:  # an engine error, or the client left during the handshake
            pd.release_unused()
            assert pd.prefill is not None
            pd.router.release(pd.prefill.target)
            raise
    prefill = spawn(pd.run_prefill(lambda leg: protocol.prefill_request(pd, leg)), "routerpanel-pd-prefill")
    try:
        try:
            answer = await asyncio.shield(prefill)
        except asyncio.CancelledError:
            pd.left_during_prefill = True
            raise
        if answer.status != 200:
            await pd.send_prefill_error(answer)
            return
        handoff = protocol.handoff(pd, answer)
        if handoff is None:
            await pd.send_prefill_completion(answer)
            return
        pd.prompt_tokens = prefill_prompt_tokens(answer)
        try:
            await pd.run_decode(
                lambda leg: protocol.decode_request(pd, leg, handoff),
                retry=protocol.decode_retries,
                retry_statuses=protocol.decode_retry_statuses,
            )
        except ProxyError:
            protocol.decode_failed(pd)
            raise
    finally:
        pd.release_unused()
        if protocol.frees_kv:
            # Runs to the end even if this task is cancelled again while waiting for it.
            await asyncio.shield(spawn(_release_after(pd, protocol, prefill), "routerpanel-pd-free"))


async def _release_after(pd: PdRequest, protocol: TwoStage, prefill: asyncio.Task) -> None:
    """Wait for the prefill call (never cancelled) and release the KV its answer holds, once."""
    try:
        answer = await prefill
    except Exception:  # the prefill failed: its error went to the client, and there is no KV id to free
        return
    key = protocol.kv_key(answer)
    if key is not None:
        if pd.left_during_prefill:
            pd_metrics.count_shielded_prefill()
        await protocol.free(pd, answer.leg, key)


class Sglang:
    """SGLang bootstrap dual dispatch: the same request with ``bootstrap_host``, ``bootstrap_port``
    and ``bootstrap_room`` to a prefill and a decode at once; the decode answers the client."""

    engine_type = EngineType.SGLANG
    default_bootstrap_port = 8998

    @staticmethod
    def batch_size(payload: dict[str, Any]) -> int:
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return len(prompt)
        return 1

    def bootstrap(self, pd: PdRequest, leg: Leg) -> dict[str, Any]:
        node = leg.target.node
        host, _ = host_port(node)
        if ":" in host:
            host = f"[{host}]"
        n = _int(pd.request.payload.get("n")) or 1
        count = self.batch_size(pd.request.payload) * max(1, n)
        rooms = [random.getrandbits(63) for _ in range(count)]
        return {
            "bootstrap_host": host,
            "bootstrap_port": node.bootstrap_port or self.default_bootstrap_port,
            "bootstrap_room": rooms[0] if count == 1 else rooms,
        }


async def dual_dispatch(pd: PdRequest, protocol: Sglang) -> None:
    """Both legs at once; the decode's answer is the client's. When the decode fails (or the client
    leaves) the prefill is cancelled; a prefill that failed first explains the failure."""
    pd.choose_pair()
    assert pd.prefill is not None
    fields = protocol.bootstrap(pd, pd.prefill)
    path = pd.request.path

    def prefill_request(leg: Leg) -> LegRequest:
        return path, pd.payload_for(leg, **fields), leg.headers(pd.request.request_id)

    def decode_request(leg: Leg) -> LegRequest:
        return path, pd.payload_for(leg, **fields), leg.headers(pd.request.request_id)

    # No retries of the prefill on another node (the decode was told this prefill's bootstrap
    # address), nor of an answered decode (it may have joined the room already).
    prefill = spawn(pd.run_prefill(prefill_request, retry=False), "routerpanel-pd-sglang-prefill")
    decode = asyncio.ensure_future(pd.run_decode(decode_request, retry_statuses=False))
    decoded = False
    try:
        await asyncio.wait({prefill, decode}, return_when=asyncio.FIRST_COMPLETED)
        if not decode.done() and pd.outcome.status == 0 and _failed(prefill):
            # The prefill failed before the decode answered: the decode would only wait in vain
            # for its bootstrap room, so stop it and answer with the prefill's error now.
            decode.cancel()
            await asyncio.wait({decode})
            await _prefill_error(pd, prefill)
            return
        try:
            await decode
            decoded = pd.outcome.error is None
        except ProxyError:
            if _failed(prefill):
                await _prefill_error(pd, prefill)
                return
            raise
    finally:
        # ``asyncio.wait`` does not cancel what it waits for: a client that left cancels us here.
        decode.cancel()
        pd.release_unused()
        if not decoded:
            prefill.cancel()
        # Both tasks' outcomes are read when they end, so none is "never retrieved".
        prefill.add_done_callback(_consume)
        decode.add_done_callback(_consume)


def _failed(prefill: asyncio.Task) -> bool:
    if not prefill.done() or prefill.cancelled():
        return False
    return prefill.exception() is not None or prefill.result().status != 200


async def _prefill_error(pd: PdRequest, prefill: asyncio.Task) -> None:
    """Answer with a failed prefill's error: its own answer, or the proxy's error for it."""
    error = prefill.exception()
    if error is not None:
        raise error
    await pd.send_prefill_error(prefill.result())


def _consume(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


TWO_STAGE: dict[str, TwoStage] = {p.engine_type: p for p in (NanoDeploy(), Vllm(), Lmdeploy())}
SGLANG = Sglang()
