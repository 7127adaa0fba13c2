"""Per-engine PD protocols (docs/pd.md), registered by engine type: what each leg sends.

Three engines hand the KV over in two stages (prefill, then decode with what the prefill returned):
NanoDeploy/DLEngine (``migration``, freed with ``/pd/free``), vLLM (NIXL ``kv_transfer_params``
under one ``X-Request-Id``; the decode's read frees it) and LMDeploy (``migration_request``; the
decode frees the prefill's session itself, ``/distserve/free_cache`` covers a decode that never
finished; its wire shapes and p2p link are in ``proxy.pd.lmdeploy``). SGLang dispatches both legs at
once and the engines meet in a bootstrap room. The protocols send nothing themselves except
LMDeploy's p2p link and the KV frees; ``proxy.pd.flows`` sequences the legs.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from nodes.choices import EngineType

from ..errors import ProxyError, engine_failed, engine_timeout
from . import lmdeploy as wire
from . import metrics as pd_metrics
from .cleanup import free_batched, free_kv, spawn
from .core import Constant, Leg, LegAnswer, LegRequest, PdRequest, host_port

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

    # Whether ``connect`` has something to do before the first prefill.
    connects = False

    def validate(self, pd: PdRequest) -> None:
        """Refuse, before any node is picked, a request the engines cannot serve in PD (a 400)."""

    async def connect(self, pd: PdRequest) -> None:
        """Set up whatever the pair needs before its first prefill (LMDeploy's p2p link); only
        called when ``connects``."""

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

    def release(self, pd: PdRequest, leg: Leg, key: Any) -> None:
        """Start releasing ``key`` on the prefill node, after the decode ended one way or another:
        a tracked clean-up (``proxy.pd.cleanup``) the request does not wait for."""
        spawn(self.free(pd, leg, key), "routerpanel-pd-free")

    async def free(self, pd: PdRequest, leg: Leg, key: Any) -> None:
        """Release ``key`` on the prefill node."""
        raise NotImplementedError

    def forget_pair(self, pd: PdRequest) -> None:
        """The decode leg failed (after any retries): forget per-pair state that may be stale."""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class NanoDeployPd(TwoStagePd):
    """NanoDeploy / DLEngine ``serve``: no ``max_tokens`` clamp (the engine stops after the first
    token and the budget must survive into the migrated sequence)."""

    engine_type = EngineType.NANODEPLOY
    _PREFILL = Constant({"stream": False, "kv_transfer_params": {"do_remote_decode": True}}, drop=_STREAM_FIELDS)

    def prefill_request(self, pd: PdRequest, leg: Leg) -> LegRequest:
        body = pd.body_with(leg, self._PREFILL)
        return pd.request.path, body, leg.headers(pd.request.request_id)

    def handoff(self, pd: PdRequest, answer: LegAnswer) -> dict[str, Any] | None:
        data = answer.data or {}
        params = data.get("kv_transfer_params")
        if isinstance(params, dict) and params.get("migration"):
            seq_id = params.get("seq_id")
            if _int(seq_id) is None:
                raise engine_failed(f"Prefill node {answer.leg.url} returned a migration without a seq_id.")
            handoff = {"migration": params["migration"], "seq_id": seq_id}  # not a comprehension: a frame less
            if "first_token" in params:
                handoff["first_token"] = params["first_token"]
            return handoff
        if data.get("choices"):
            return None
        raise engine_failed(
            f"Prefill node {answer.leg.url} returned neither a migration nor a completion.", "prefill_failed"
        )

    def decode_request(self, pd: PdRequest, leg: Leg, handoff: dict[str, Any]) -> LegRequest:
        return pd.request.path, pd.body_for(leg, kv_transfer_params=handoff), leg.headers(pd.request.request_id)

    def kv_key(self, answer: LegAnswer) -> Any | None:
        if answer.status != 200:
            return None
        params = (answer.data or {}).get("kv_transfer_params")
        return _int(params.get("seq_id")) if isinstance(params, dict) else None

    def release(self, pd: PdRequest, leg: Leg, key: Any) -> None:
        # DLEngine's /pd/free takes a list of seq_ids, queues their release and answers the ids it was
        # given (a 200 is all it reports): the releases for one prefill node share a call.
        free_batched(pd, leg, "/pd/free", key)


class VllmPd(TwoStagePd):
    """vLLM (docs/pd.md), as its own disaggregation proxies drive it: the prefill is the request cut
    to one token, not streamed, with remote-decode ``kv_transfer_params``; the decode is the request
    plus the ``kv_transfer_params`` the prefill answered, unchanged (NIXL: the blocks to pull, named
    by their ``remote_request_id``). A prefill that answers none (``null``, as the ExampleConnector
    and LMCache do: the decode finds the KV by the prompt, or computes it) is no error: the decode
    is sent without them. Both legs carry the request's one ``X-Request-Id``. The decode's pull
    releases the blocks; an abandoned transfer is released when the prefill's NIXL lease runs out."""

    engine_type = EngineType.VLLM
    frees_kv = False
    # A decode that answered may have pulled the blocks already, which releases them on the prefill:
    # it is not swapped for another decode node (one that could not be reached is).
    decode_retry_statuses = False

    _PREFILL_KV = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    # vLLM answers 400 when min_tokens exceeds the prefill's max_tokens of 1; its proxies drop both
    # spellings from the prefill copy (the decode keeps the client's).
    _PREFILL_DROP = (*_STREAM_FIELDS, "min_tokens", "min_completion_tokens")

    def prefill_request(self, pd: PdRequest, leg: Leg) -> LegRequest:
        changes: dict[str, Any] = {"stream": False, "max_tokens": 1}
        if "max_completion_tokens" in pd.request.payload:
            changes["max_completion_tokens"] = 1
        body = pd.payload_for(leg, drop=self._PREFILL_DROP, kv_transfer_params=dict(self._PREFILL_KV), **changes)
        return pd.request.path, body, leg.headers(pd.request.request_id)

    def handoff(self, pd: PdRequest, answer: LegAnswer) -> dict[str, Any] | None:
        """The prefill's ``kv_transfer_params`` for the decode; ``{}`` when it answered none."""
        if answer.data is None:
            raise engine_failed(f"Prefill node {answer.leg.url} answered 200 without a JSON object.", "prefill_failed")
        params = answer.data.get("kv_transfer_params")
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise engine_failed(
                f"Prefill node {answer.leg.url} returned kv_transfer_params that are not an object.", "prefill_failed"
            )
        return params

    def decode_request(self, pd: PdRequest, leg: Leg, handoff: dict[str, Any]) -> LegRequest:
        changes: dict[str, Any] = {"kv_transfer_params": handoff} if handoff else {}
        return pd.request.path, pd.body_for(leg, **changes), leg.headers(pd.request.request_id)


class LmdeployPd(TwoStagePd):
    """LMDeploy migration (``lmdeploy serve proxy --serving-strategy DistServe`` semantics).

    A one-token prefill that preserves its cache, then a decode with a ``migration_request``. The
    decode engine reads the blocks and then frees the prefill's session itself (over its ZMQ link),
    so RouterPanel calls ``/distserve/free_cache`` only when the decode did not finish: it failed,
    timed out, was never sent, or the client left. A second free of a session is harmless there
    (sessions are numbered upwards and never reused; an unknown one is only logged).
    """

    engine_type = EngineType.LMDEPLOY
    connects = True
    # Another decode node has no p2p link with this prefill: a migration to it would fail.
    decode_retry_other_node = False

    _PREFILL_DROP = ("stream_options", "migration_request")
    _DECODE_DROP = ("with_cache", "preserve_cache")

    def __init__(self) -> None:
        self.links = wire.Links()

    def validate(self, pd: PdRequest) -> None:
        n = _int(pd.request.payload.get("n"))
        if pd.request.path.endswith("/chat/completions") and n is not None and n > 1:
            # The engine refuses cache migration for n > 1 (400), as LMDeploy's proxy does up front.
            raise ProxyError(400, "n > 1 is not supported with LMDeploy prefill/decode serving.", "pd_n_unsupported")

    async def connect(self, pd: PdRequest) -> None:
        assert pd.prefill is not None and pd.decode is not None
        try:
            async with asyncio.timeout(pd.prefill_timeout):
                await self.links.ensure(pd, pd.prefill, pd.decode)
        except TimeoutError:
            raise engine_timeout(
                f"LMDeploy link {pd.prefill.url} -> {pd.decode.url} not made within {pd.prefill_timeout:g} s.",
                "pd_connect_timeout",
            ) from None

    def prefill_request(self, pd: PdRequest, leg: Leg) -> LegRequest:
        # max_completion_tokens wins over max_tokens in LMDeploy, on completions too: both are set to
        # 1, or a client's max_completion_tokens would turn the prefill into the whole generation.
        body = pd.payload_for(
            leg,
            drop=self._PREFILL_DROP,
            stream=False,
            max_tokens=1,
            max_completion_tokens=1,
            with_cache=True,
            preserve_cache=True,
        )
        return pd.request.path, body, leg.headers(pd.request.request_id)

    def forget_pair(self, pd: PdRequest) -> None:
        # A restarted engine has lost its p2p links: link the pair again on its next request.
        if pd.prefill is not None and pd.decode is not None:
            self.links.forget(pd.prefill.url, pd.decode.url)

    def handoff(self, pd: PdRequest, answer: LegAnswer) -> dict[str, Any] | None:
        data = answer.data or {}
        blocks = data.get("cache_block_ids")
        tokens = data.get("remote_token_ids")
        if (
            not isinstance(blocks, list)
            or not all(_int(b) is not None for b in blocks)
            or not isinstance(tokens, list)
            or not tokens
            or _int(tokens[-1]) is None
        ):
            raise engine_failed(
                f"Prefill node {answer.leg.url} returned no migratable cache (cache_block_ids, remote_token_ids).",
                "prefill_failed",
            )
        session = wire.session_of(data)
        return dict(wire.migration_request(answer.leg.url, session, blocks, tokens[-1]))

    def decode_request(self, pd: PdRequest, leg: Leg, handoff: dict[str, Any]) -> LegRequest:
        body = pd.payload_for(leg, drop=self._DECODE_DROP, migration_request=handoff)
        return pd.request.path, body, leg.headers(pd.request.request_id)

    def kv_key(self, answer: LegAnswer) -> Any | None:
        """The preserved session (``UNKNOWN_SESSION`` when no field names it), None when nothing is held."""
        data = answer.data or {}
        if answer.status != 200 or not isinstance(data.get("cache_block_ids"), list):
            return None
        return wire.session_of(data)

    async def free(self, pd: PdRequest, leg: Leg, key: Any) -> None:
        if key == wire.UNKNOWN_SESSION:
            # Neither RouterPanel nor the decode can name this session: it stays on the prefill
            # engine (the leak docs/pd.md describes). Counted so operators can see it.
            pd_metrics.count_unreleasable()
            return
        if pd.decode_completed:
            return  # the decode engine freed it after reading the blocks
        await free_kv(pd, leg, "/distserve/free_cache", dict(wire.cache_free_request(leg.url, key)))


class SglangPd:
    """SGLang bootstrap dual dispatch: the same request with ``bootstrap_host``, ``bootstrap_port``
    and ``bootstrap_room`` to a prefill and a decode at once; the decode answers the client."""

    engine_type = EngineType.SGLANG
    default_bootstrap_port = 8998

    # What SGLang's gateway (sgl-model-gateway, now smg) retries a whole pair on, with a new pair and
    # room each time: these engine statuses, and a leg that got no answer. RouterPanel's own
    # first-token timeout is not retried: it already bounds how long the client waits.
    RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
    # Its backoff: 50 ms x 1.5^n, at most 30 s, +-20 % jitter.
    BACKOFF_INITIAL = 0.05
    BACKOFF_MULTIPLIER = 1.5
    BACKOFF_MAX = 30.0
    BACKOFF_JITTER = 0.2

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        delay = min(self.BACKOFF_INITIAL * self.BACKOFF_MULTIPLIER**retry, self.BACKOFF_MAX)
        return delay * (1 + random.uniform(-self.BACKOFF_JITTER, self.BACKOFF_JITTER))

    def retry_reason_prefill(self, prefill: asyncio.Task) -> str | None:
        """Why a failed prefill leg's pair is worth another try (None: it is not)."""
        error = prefill.exception()
        if isinstance(error, ProxyError):
            return self._retry_reason(error.code, 0)
        if error is not None:
            return None
        status = prefill.result().status
        return str(status) if status in self.RETRY_STATUSES else None

    def retry_reason_decode(self, error: ProxyError, status: int) -> str | None:
        """Why a failed decode leg's pair is worth another try; ``status`` is its engine's answer (0: none)."""
        return self._retry_reason(error.code, status)

    def _retry_reason(self, code: str, status: int) -> str | None:
        if code.endswith("_unreachable"):
            return "connect"
        if code.endswith("_failed"):
            if not status:
                return "transport"  # the connection broke before an answer
            return str(status) if status in self.RETRY_STATUSES else None
        return None  # a timeout, or a 4xx that another pair would answer the same

    @staticmethod
    def batch_size(payload: dict[str, Any]) -> int:
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return len(prompt)
        return 1

    def bootstrap(self, pd: PdRequest, leg: Leg) -> dict[str, Any]:
        """The bootstrap fields for a pair whose prefill is ``leg``, with fresh rooms.

        One room for a single sequence; for a batch or ``n > 1`` a list of ``batch * n`` distinct
        random rooms (SGLang repeats a list ``n`` times and takes the first ``batch * n`` entries, so
        a list of that length gives every sequence its own room). A single int would also do (SGLang
        derives ``room + i``), but explicit rooms are what the gateways send for batches and show in
        both legs' logs exactly which room each sequence used."""
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
