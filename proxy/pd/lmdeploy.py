"""LMDeploy's DistServe wire protocol: the JSON shapes RouterPanel sends and reads, and the per-pair
p2p link (docs/pd.md, "LMDeploy").

The shapes mirror LMDeploy's own pydantic models (``lmdeploy/pytorch/disagg/config.py`` and
``lmdeploy/pytorch/disagg/conn/protocol.py``); ``tests/realengines/test_lmdeploy_models.py``
validates what RouterPanel builds against the real package. Two encodings matter:

- LMDeploy's enums are plain ``enum.Enum`` with ``auto()`` values, validated by value: on the wire
  they are integers (``MigrationProtocol.RDMA`` is ``2``); the string ``"RDMA"`` is refused.
- ``GET /distserve/engine_info`` answers a JSON *string* that holds the engine config's JSON (the
  endpoint returns ``model_dump_json()``), so its body is parsed twice.

A pair's link is made the way LMDeploy's proxy makes it: the engine config of both engines, then
``p2p_initialize`` on each (local and remote ids are the node URLs; the engine binds its ZMQ socket
on the local URL's host), then ``p2p_connect`` on each with the *peer's* init answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, NotRequired, TypedDict, TypeGuard

import aiohttp

from ..errors import ProxyError, engine_failed
from ..request import JSON_ERRORS
from .core import Leg, LegAnswer, PdRequest

logger = logging.getLogger(__name__)

# MigrationProtocol: TCP=1, RDMA=2, NVLINK=3 (only RDMA is implemented by LMDeploy's engines).
PROTOCOL_RDMA = 2
# DistServeConnectionStatus: SUCCESS=1, FAIL=2.
STATUS_SUCCESS = 1
# RDMALinkType: IB=1, RoCE=2. LMDeploy's proxy defaults to RoCE with GPU-direct RDMA.
LINK_ROCE = 2

# ``remote_session_id`` when no answer field names the prefill's session (LMDeploy >= 0.15 without
# ``cache_session_id``). LMDeploy numbers its sessions from 0 upwards and never reuses a number, so
# -1 can never free somebody else's session: the decode's release simply misses.
UNKNOWN_SESSION = -1

# LMDeploy's proxy retries a failed link up to 8 times (``max_retry_cnt``); so does RouterPanel,
# for answers that may succeed next time (no answer, a 5xx), never for a 4xx.
CONNECT_ATTEMPTS = 8
STEP_TIMEOUT = 30.0


class EngineConfig(TypedDict):
    """``DistServeEngineConfig``: every field is required (``pp_size`` may be null)."""

    tp_size: int
    ep_size: int
    dp_size: int
    pp_size: int | None
    dp_rank: int
    block_size: int
    num_cpu_blocks: int
    num_gpu_blocks: int


class RdmaConfig(TypedDict):
    """``DistServeRDMAConfig``."""

    with_gdr: bool
    link_type: int


class InitRequest(TypedDict):
    """``DistServeInitRequest``: POST /distserve/p2p_initialize."""

    local_engine_id: str
    local_engine_config: EngineConfig
    remote_engine_id: str
    remote_engine_config: EngineConfig
    protocol: int
    rdma_config: RdmaConfig


class EngineEndpointInfo(TypedDict):
    """``DistServeEngineEndpointInfo``: where the engine's ZMQ socket listens."""

    zmq_address: str


class KvTransferEndpointInfo(TypedDict):
    """``DistServeKVTransferEndpointInfo``, one per TP rank (passed to the peer unchanged)."""

    protocol: int
    endpoint_info: str
    cache_pools: NotRequired[list[dict[str, Any]] | None]


class InitResponse(TypedDict):
    """``DistServeInitResponse``."""

    status: int
    engine_endpoint_info: EngineEndpointInfo
    kvtransfer_endpoint_info: list[KvTransferEndpointInfo]


class ConnectRequest(TypedDict):
    """``DistServeConnectionRequest``: POST /distserve/p2p_connect, with the peer's init answer."""

    protocol: int
    remote_engine_id: str
    remote_engine_endpoint_info: EngineEndpointInfo
    remote_kvtransfer_endpoint_info: list[KvTransferEndpointInfo]


class MigrationRequest(TypedDict):
    """``MigrationRequest``: the decode body's ``migration_request``."""

    protocol: int
    remote_engine_id: str
    remote_session_id: int
    remote_token_id: int
    remote_block_ids: list[int]
    is_dummy_prefill: bool


class CacheFreeRequest(TypedDict):
    """``DistServeCacheFreeRequest``: POST /distserve/free_cache."""

    remote_engine_id: str
    remote_session_id: int


class WireError(ValueError):
    """An engine answer that does not have LMDeploy's shape."""


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


_CONFIG_FIELDS = ("tp_size", "ep_size", "dp_size", "dp_rank", "block_size", "num_cpu_blocks", "num_gpu_blocks")


def parse_engine_info(body: bytes) -> EngineConfig:
    """The engine config in a ``GET /distserve/engine_info`` answer: JSON of a string of JSON."""
    try:
        data: Any = json.loads(body)
        if isinstance(data, str):
            data = json.loads(data)
    except JSON_ERRORS as exc:
        raise WireError(f"engine_info is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WireError("engine_info is not an object")
    missing = [f for f in _CONFIG_FIELDS if not _is_int(data.get(f))]
    if missing or "pp_size" not in data or not (data["pp_size"] is None or _is_int(data["pp_size"])):
        raise WireError(f"engine_info lacks integer fields: {', '.join(missing) or 'pp_size'}")
    config: EngineConfig = {
        "tp_size": data["tp_size"],
        "ep_size": data["ep_size"],
        "dp_size": data["dp_size"],
        "pp_size": data["pp_size"],
        "dp_rank": data["dp_rank"],
        "block_size": data["block_size"],
        "num_cpu_blocks": data["num_cpu_blocks"],
        "num_gpu_blocks": data["num_gpu_blocks"],
    }
    return config


def parse_init_response(data: Any) -> InitResponse:
    """A ``p2p_initialize`` answer, checked for what the peer's ``p2p_connect`` needs."""
    if not isinstance(data, dict) or data.get("status") != STATUS_SUCCESS:
        raise WireError(f"p2p_initialize did not succeed: {str(data)[:200]}")
    endpoint = data.get("engine_endpoint_info")
    transfer = data.get("kvtransfer_endpoint_info")
    if not isinstance(endpoint, dict) or not isinstance(endpoint.get("zmq_address"), str):
        raise WireError("p2p_initialize answered no engine_endpoint_info.zmq_address")
    if not isinstance(transfer, list) or not all(
        isinstance(t, dict) and _is_int(t.get("protocol")) and isinstance(t.get("endpoint_info"), str) for t in transfer
    ):
        raise WireError("p2p_initialize answered no kvtransfer_endpoint_info list")
    answer: InitResponse = {
        "status": STATUS_SUCCESS,
        "engine_endpoint_info": {"zmq_address": endpoint["zmq_address"]},
        "kvtransfer_endpoint_info": transfer,  # passed to the peer as the engine gave it
    }
    return answer


def init_request(local: str, local_config: EngineConfig, remote: str, remote_config: EngineConfig) -> InitRequest:
    return {
        "local_engine_id": local,
        "local_engine_config": local_config,
        "remote_engine_id": remote,
        "remote_engine_config": remote_config,
        "protocol": PROTOCOL_RDMA,
        "rdma_config": {"with_gdr": True, "link_type": LINK_ROCE},
    }


def connect_request(remote: str, peer: InitResponse) -> ConnectRequest:
    return {
        "protocol": PROTOCOL_RDMA,
        "remote_engine_id": remote,
        "remote_engine_endpoint_info": peer["engine_endpoint_info"],
        "remote_kvtransfer_endpoint_info": peer["kvtransfer_endpoint_info"],
    }


def migration_request(prefill: str, session: int, blocks: list[int], token: int) -> MigrationRequest:
    return {
        "protocol": PROTOCOL_RDMA,
        "remote_engine_id": prefill,
        "remote_session_id": session,
        "remote_token_id": token,
        "remote_block_ids": blocks,
        "is_dummy_prefill": False,
    }


def cache_free_request(prefill: str, session: int) -> CacheFreeRequest:
    return {"remote_engine_id": prefill, "remote_session_id": session}


def session_of(data: dict[str, Any]) -> int:
    """The prefill's internal session id in its answer, or ``UNKNOWN_SESSION``.

    - ``cache_session_id``: the explicit field LMDeploy is adding for routers (not in 0.18).
    - a chat ``id`` that is a number: LMDeploy <= 0.14 answered ``str(session_id)``.
    - anything else names no session: a chat ``id`` is ``chatcmpl-…`` since 0.15, and a completion's
      ``id`` is the *client's* ``session_id`` (default -1), which LMDeploy >= 0.13 maps to an
      internal id it does not return.
    """
    explicit = data.get("cache_session_id")
    if _is_int(explicit) and explicit >= 0:
        return explicit
    ident = data.get("id")
    if data.get("object") == "chat.completion" and isinstance(ident, str) and ident.isdigit():
        return int(ident)
    return UNKNOWN_SESSION


class Links:
    """The p2p links between prefill and decode engines, made once per (prefill, decode) pair.

    Concurrent first requests for a pair wait for one handshake instead of each making their own.
    A pair whose migration failed is forgotten and linked again on its next request (a restarted
    engine has lost its links).
    """

    def __init__(self) -> None:
        self._linked: set[tuple[str, str]] = set()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def forget(self, prefill: str, decode: str) -> None:
        self._linked.discard((prefill, decode))

    async def ensure(self, pd: PdRequest, prefill: Leg, decode: Leg) -> None:
        pair = (prefill.url, decode.url)
        if pair in self._linked:
            return
        lock = self._locks.setdefault(pair, asyncio.Lock())
        async with lock:
            if pair in self._linked:
                return
            await self._link(pd, prefill, decode)
            self._linked.add(pair)

    async def _link(self, pd: PdRequest, prefill: Leg, decode: Leg) -> None:
        error: ProxyError | None = None
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                await _handshake(pd, prefill, decode)
                return
            except _Retryable as exc:
                error = exc.error
                logger.warning("LMDeploy link %s -> %s, attempt %d: %s", prefill.url, decode.url, attempt + 1, error)
                if attempt + 1 < CONNECT_ATTEMPTS:
                    await asyncio.sleep(0.05 * (attempt + 1))
        assert error is not None
        raise error


class _Retryable(Exception):
    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


async def _handshake(pd: PdRequest, prefill: Leg, decode: Leg) -> None:
    configs = [await _engine_info(pd, leg) for leg in (prefill, decode)]
    if configs[0]["tp_size"] != configs[1]["tp_size"]:
        raise _failed(
            f"LMDeploy prefill {prefill.url} (tp {configs[0]['tp_size']}) and decode {decode.url} "
            f"(tp {configs[1]['tp_size']}) differ in tensor parallelism; LMDeploy links only equal sizes."
        )
    p_init = await _step(pd, prefill, "p2p_initialize", init_request(prefill.url, configs[0], decode.url, configs[1]))
    d_init = await _step(pd, decode, "p2p_initialize", init_request(decode.url, configs[1], prefill.url, configs[0]))
    try:
        p_info, d_info = parse_init_response(p_init.data), parse_init_response(d_init.data)
    except WireError as exc:
        raise _Retryable(_failed(f"LMDeploy p2p_initialize: {exc}")) from None
    for leg, peer, info in ((prefill, decode, d_info), (decode, prefill, p_info)):
        answer = await _step(pd, leg, "p2p_connect", connect_request(peer.url, info))
        if (answer.data or {}).get("status") != STATUS_SUCCESS:
            raise _Retryable(_failed(f"LMDeploy p2p_connect on {leg.url} answered {answer.body[:200]!r}"))


def _failed(message: str) -> ProxyError:
    return engine_failed(message, "pd_connect_failed")


async def _engine_info(pd: PdRequest, leg: Leg) -> EngineConfig:
    answer = await _call(pd, leg, "GET", "/distserve/engine_info", None)
    try:
        return parse_engine_info(answer.body)
    except WireError as exc:
        raise _failed(f"LMDeploy {leg.url}/distserve/engine_info: {exc}") from None


async def _step(pd: PdRequest, leg: Leg, step: str, body: Any) -> LegAnswer:
    return await _call(pd, leg, "POST", f"/distserve/{step}", body)


async def _call(pd: PdRequest, leg: Leg, method: str, path: str, body: Any) -> LegAnswer:
    try:
        answer = await pd.call_json(leg, method, path, body, STEP_TIMEOUT)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _Retryable(_failed(f"LMDeploy {path} on {leg.url} failed: {exc!r}")) from None
    if answer.status >= 500:
        raise _Retryable(_failed(f"LMDeploy {path} on {leg.url} answered {answer.status}: {answer.message()}"))
    if answer.status != 200:
        raise _failed(f"LMDeploy {path} on {leg.url} answered {answer.status}: {answer.message()}")
    return answer
