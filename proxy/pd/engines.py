"""Per-engine PD protocols (docs/pd.md), registered by engine type: what each leg sends.

Three engines hand the KV over in two stages (prefill, then decode with what the prefill returned):
NanoDeploy/DLEngine (``migration``, freed with ``/pd/free``), vLLM (NIXL ``kv_transfer_params``
under one ``X-Request-Id``; the decode's read frees it) and LMDeploy (``migration_request``, freed
with ``/distserve/free_cache``). SGLang dispatches both legs at once and the engines meet in a
bootstrap room. The protocols send nothing themselves except LMDeploy's one-off p2p handshake and
the KV frees; ``proxy.pd.flows`` sequences the legs.
"""

from __future__ import annotations

import contextlib
import random
import uuid
from typing import Any

import aiohttp

from nodes.choices import EngineType

from ..errors import engine_failed
from .cleanup import free_kv
from .core import Leg, LegAnswer, LegRequest, PdRequest, host_port

_STREAM_FIELDS = ("stream_options",)


class TwoStagePd:
    """Prefill, hand the KV over, decode, release. Subclasses say what each step sends."""

    engine_type = ""
    # True when the router must release the prefill's KV itself (vLLM's decode read releases it).
    frees_kv = True
    # Whether a decode that could not be reached, or (the second) answered 429/502/503, is retried
    # on another decode node while nothing has reached the client.
    decode_retry_other_node = True
    decode_retry_statuses = True

    async def connect(self, pd: PdRequest) -> None:
        """Set up whatever the pair needs before its first prefill (LMDeploy's p2p link)."""

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

    def forget_pair(self, pd: PdRequest) -> None:
        """The decode leg failed (after any retries): forget per-pair state that may be stale."""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class NanoDeployPd(TwoStagePd):
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
        await free_kv(pd, leg, "/pd/free", {"seq_ids": [key]}, lambda a: key in ((a.data or {}).get("freed") or ()))


class VllmPd(TwoStagePd):
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


class LmdeployPd(TwoStagePd):
    """LMDeploy migration: one-token prefill that keeps its cache, decode with a ``migration_request``,
    then ``/distserve/free_cache``. The pair's p2p connection is set up once per process, as
    LMDeploy's proxy does (``p2p_initialize`` then ``p2p_connect`` on both engines)."""

    engine_type = EngineType.LMDEPLOY
    protocol = "RDMA"
    # Another decode node has no p2p link with this prefill: a migration to it would fail.
    decode_retry_other_node = False

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

    def forget_pair(self, pd: PdRequest) -> None:
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
        body = {"session_id": key}
        await free_kv(pd, leg, "/distserve/free_cache", body, lambda a: bool((a.data or {}).get("freed")))


class SglangPd:
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


TWO_STAGE: dict[str, TwoStagePd] = {p.engine_type: p for p in (NanoDeployPd(), VllmPd(), LmdeployPd())}
SGLANG = SglangPd()
