"""The two ways a PD request's legs are sequenced; the only places that do (docs/pd.md).

``two_stage``: prefill, hand the KV over, decode, release (NanoDeploy/DLEngine, vLLM, LMDeploy).
``dual_dispatch``: both legs at once, the engines meet in a bootstrap room (SGLang).
Either way every node slot and every KV hold on a prefill node is released on every path: success,
engine error, timeout, mid-stream failure, and a client that leaves at any moment.
"""

from __future__ import annotations

import asyncio
from functools import partial

from .. import metrics as proxy_metrics
from ..errors import ProxyError
from . import core
from . import metrics as pd_metrics
from .cleanup import spawn
from .core import Leg, LegAnswer, LegRequest, PdRequest
from .engines import SglangPd, TwoStagePd
from .legs import run_decode, run_prefill, send_prefill_completion, send_prefill_error
from .usage import prefill_prompt_tokens


async def two_stage(pd: PdRequest, protocol: TwoStagePd) -> None:
    """Prefill → decode → release, with the release on every path after the prefill was sent.

    The prefill call runs as its own task, shielded (``_prefilled``): a client that leaves while it
    is in flight cancels only our wait (and so does a worker's forced shutdown), and a clean-up task
    lets the call finish (bounded by the prefill timeout) and releases the KV its answer names,
    which the engine would otherwise keep. The release itself is a tracked clean-up the request
    does not wait for (``proxy.pd.cleanup``).
    """
    core.started()
    try:
        protocol.validate(pd)
        pd.choose_pair()
        assert pd.prefill is not None
        if protocol.connects:
            try:
                await protocol.connect(pd)
            except BaseException:  # an engine error, or the client left during the handshake
                pd.release_unused()
                pd.router.release(pd.prefill.target)
                raise
        prefill = spawn(run_prefill(pd, protocol.prefill_request), "routerpanel-pd-prefill")
        try:
            prefilled = prefill.get_loop().create_future()
            prefill.add_done_callback(partial(_prefilled, prefilled))
            try:
                await prefilled  # cancelled, it leaves the prefill running
            except asyncio.CancelledError:
                pd.left_during_prefill = True
                raise
            answer = prefill.result()
            # The client's answer: the prefill's error, its whole completion, or the decode's.
            if answer.status != 200:
                await send_prefill_error(pd, answer)
                return
            handoff = protocol.handoff(pd, answer)
            if handoff is None:
                await send_prefill_completion(pd, answer)
                return
            pd.prompt_tokens = prefill_prompt_tokens(answer)
            try:
                await run_decode(
                    pd,
                    lambda pd, leg: protocol.decode_request(pd, leg, handoff),
                    retry_other_node=protocol.decode_retry_other_node,
                    retry_statuses=protocol.decode_retry_statuses,
                )
            except ProxyError:
                protocol.forget_pair(pd)
                raise
        finally:
            pd.release_unused()
            if protocol.frees_kv:
                if prefill.done():
                    _release(pd, protocol, prefill)
                else:  # the client left during the prefill: release what it holds once it answers
                    spawn(_release_after(pd, protocol, prefill), "routerpanel-pd-free")
    finally:
        core.ended()


def _prefilled(waiter: asyncio.Future[None], prefill: asyncio.Task) -> None:
    """``asyncio.shield`` for the prefill, for less: wake the request, which reads the prefill's
    outcome itself. Its exception is marked as read here, for when the client left and nobody does."""
    if not prefill.cancelled():
        prefill.exception()
    if not waiter.done():
        waiter.set_result(None)


async def _release_after(pd: PdRequest, protocol: TwoStagePd, prefill: asyncio.Task) -> None:
    """Wait for the prefill call (never cancelled), then release the KV its answer holds."""
    await asyncio.wait({prefill})
    _release(pd, protocol, prefill)


def _release(pd: PdRequest, protocol: TwoStagePd, prefill: asyncio.Task) -> None:
    """Release, once, the KV a finished prefill call holds (none when it failed: its error went to
    the client, and there is no KV id to free)."""
    if prefill.cancelled() or prefill.exception() is not None:  # cancelled: only at shutdown
        return
    answer: LegAnswer = prefill.result()
    key = protocol.kv_key(answer)
    if key is not None:
        if pd.left_during_prefill:
            pd_metrics.count_shielded_prefill()
        protocol.release(pd, answer.leg, key)


async def dual_dispatch(pd: PdRequest, protocol: SglangPd) -> None:
    """Both legs at once; the decode's answer is the client's. When the decode fails (or the client
    leaves) the prefill is cancelled; a prefill that failed first explains the failure.

    A pair that failed with a status SGLang's own gateway retries (``SglangPd.RETRY_STATUSES``), or
    whose node could not be reached, is tried again while nothing reached the client: a new pair
    (other nodes when there are any) and a fresh bootstrap room, after a backoff with jitter, up to
    the route policy's retry budget. Both legs of the failed pair were released first."""
    core.started()
    try:
        await _dispatch(pd, protocol)
    finally:
        core.ended()


async def _dispatch(pd: PdRequest, protocol: SglangPd) -> None:
    attempts = pd.policy.retry_budget + 1
    failed_prefills: list[int] = []
    failed_decodes: list[int] = []
    for number in range(attempts):
        if number:
            await asyncio.sleep(protocol.backoff(number - 1))
        pd.choose_pair(failed_prefills, failed_decodes)
        assert pd.prefill is not None and pd.decode is not None
        pair = (pd.prefill.target.node.id, pd.decode.target.node.id)
        reason = await _dispatch_once(pd, protocol, final=number + 1 == attempts)
        if reason is None:
            return
        proxy_metrics.count_retry(pd.route.name, f"pd_pair_{reason}")
        failed_prefills.append(pair[0])
        failed_decodes.append(pair[1])


async def _dispatch_once(pd: PdRequest, protocol: SglangPd, *, final: bool) -> str | None:
    """One pair, one room. Returns why to try a new pair (only when not ``final`` and nothing
    reached the client), or None once the client was answered (or an error was raised for it)."""
    assert pd.prefill is not None
    fields = protocol.bootstrap(pd, pd.prefill)
    path = pd.request.path

    def request(pd: PdRequest, leg: Leg) -> LegRequest:  # the same body for both legs
        return path, pd.payload_for(leg, **fields), leg.headers(pd.request.request_id)

    # No retries inside a leg: the decode was told this prefill's bootstrap address and room, so a
    # retry is a new pair with a new room (``dual_dispatch``).
    prefill = spawn(run_prefill(pd, request, retry=False), "routerpanel-pd-sglang-prefill")
    decode = asyncio.ensure_future(run_decode(pd, request, retry_other_node=False, retry_statuses=False))
    decode_ok = False
    retry: str | None = None
    try:
        await asyncio.wait({prefill, decode}, return_when=asyncio.FIRST_COMPLETED)
        if not decode.done() and pd.outcome.status == 0 and _failed(prefill):
            # The prefill failed before the decode answered: the decode would only wait in vain
            # for its bootstrap room, so stop it and answer with the prefill's error now.
            decode.cancel()
            await asyncio.wait({decode})
            retry = None if final else protocol.retry_reason_prefill(prefill)
            if retry is None:
                await _prefill_error(pd, prefill)
            return retry
        try:
            await decode
            decode_ok = pd.outcome.error is None
        except ProxyError as exc:
            nothing_sent = pd.outcome.status == 0
            if _failed(prefill):
                retry = None if final or not nothing_sent else protocol.retry_reason_prefill(prefill)
                if retry is None:
                    await _prefill_error(pd, prefill)
                return retry
            retry = None if final or not nothing_sent else protocol.retry_reason_decode(exc, pd.decode_status)
            if retry is None:
                raise
            return retry
    finally:
        # ``asyncio.wait`` does not cancel what it waits for: a client that left cancels us here.
        decode.cancel()
        pd.release_unused()
        if not decode_ok:
            prefill.cancel()
        # Both tasks' outcomes are read when they end, so none is "never retrieved".
        prefill.add_done_callback(_consume)
        decode.add_done_callback(_consume)
        if retry is not None:
            # Before a new pair: both legs of this one have ended and released their nodes.
            await asyncio.wait({prefill, decode})
    return None


def _failed(prefill: asyncio.Task) -> bool:
    if not prefill.done() or prefill.cancelled():
        return False
    return prefill.exception() is not None or prefill.result().status != 200


async def _prefill_error(pd: PdRequest, prefill: asyncio.Task) -> None:
    """Answer with a failed prefill's error: its own answer, or the proxy's error for it."""
    error = prefill.exception()
    if error is not None:
        raise error
    await send_prefill_error(pd, prefill.result())


def _consume(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
