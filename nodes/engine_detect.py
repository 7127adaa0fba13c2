"""Which engine a node runs, read from the engine's own endpoints, for nodes added without an
``engine_type`` (``/nodes/add``, a control plane's registration URL, the REST API).

1. ``GET /v1/models``: each engine names itself in ``owned_by``: ``vllm``, ``sglang``, ``lmdeploy``,
   ``dlengine`` (NanoDeploy/DLEngine ``serve``).
2. When it does not (a fork, a wrapper), the endpoints only one engine has, asked at once:
   SGLang's ``GET /server_info`` (or its older ``/get_server_info``) with ``model_path``;
   LMDeploy's ``GET /distserve/engine_info`` (a JSON string holding its cache configuration);
   NanoDeploy's ``/pd/free`` (POST only, so a GET answers 405); vLLM's ``GET /version``.
   vLLM's own ``/server_info`` exists only in its development mode and has no ``model_path``.
3. An engine that answers but matches none of them is a plain OpenAI-compatible server.
4. For a vLLM server, which endpoints it serves (``Node.endpoints``): vLLM registers only the routes
   its model's tasks need (a pooling model has no ``/v1/completions``, a generation model no
   ``/v1/embeddings``), and FastAPI answers a ``GET`` on a POST-only route with 405, on a missing
   one with 404. So a ``GET`` per path tells, with no inference run. Only a list that differs from
   vLLM's default (a generation model's) is kept; an inconclusive answer keeps the default.
5. One that does not answer gets the configured default, marked ``pending``: the health checker
   detects it once the node answers its ``/health`` (LMDeploy registers itself before it listens,
   so a registration can never reach it at once).

Every request has a short timeout (``ROUTERPANEL_ENGINE_DETECT_TIMEOUT``). Callers are sync Django
views, serializers and the Celery health checker: none of it runs on a web worker's event loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import engine_client
from .choices import EngineType
from .rules import DEFAULT_ENDPOINTS, ENDPOINT_PATHS

if TYPE_CHECKING:
    import httpx

# owned_by in /v1/models -> engine type
OWNED_BY = {
    "vllm": EngineType.VLLM,
    "sglang": EngineType.SGLANG,
    "lmdeploy": EngineType.LMDEPLOY,
    "dlengine": EngineType.NANODEPLOY,
    "nanodeploy": EngineType.NANODEPLOY,
}

# What a node's metadata says about its engine type (key ``engine_detection``).
DETECTION_KEY = "engine_detection"
DETECTED = "detected"
PENDING = "pending"


@dataclass(frozen=True)
class Detection:
    """What the engine's endpoints showed. ``engine_type`` is ``None`` when nothing answered."""

    engine_type: str | None
    evidence: str
    models: list[str] | None = None  # what /v1/models listed, when it answered with a model list
    endpoints: list[str] | None = None  # what it serves, when that differs from its type's default


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _sglang(client: httpx.Client, base: str) -> str | None:
    for path in ("/server_info", "/get_server_info"):
        response = client.get(base + path)
        info = _json(response) if response.status_code == 200 else None
        if isinstance(info, dict) and "model_path" in info:
            return f"GET {path} answered SGLang's server info"
    return None


def _lmdeploy(client: httpx.Client, base: str) -> str | None:
    response = client.get(base + "/distserve/engine_info")
    info = _json(response) if response.status_code == 200 else None
    if isinstance(info, str):  # LMDeploy returns model_dump_json(): JSON inside a JSON string
        try:
            info = json.loads(info)
        except ValueError:
            return None
    if isinstance(info, dict) and "num_gpu_blocks" in info:
        return "GET /distserve/engine_info answered LMDeploy's engine config"
    return None


def _nanodeploy(client: httpx.Client, base: str) -> str | None:
    if client.get(base + "/pd/free").status_code == 405:
        return "/pd/free exists (POST only)"
    return None


def _vllm(client: httpx.Client, base: str) -> str | None:
    response = client.get(base + "/version")
    info = _json(response) if response.status_code == 200 else None
    if isinstance(info, dict) and isinstance(info.get("version"), str):
        return f"GET /version answered {{'version': {info['version']!r}}}"
    return None


# In order of preference when several answer.
PROBES: tuple[tuple[str, Callable[[httpx.Client, str], str | None]], ...] = (
    (EngineType.SGLANG, _sglang),
    (EngineType.LMDEPLOY, _lmdeploy),
    (EngineType.NANODEPLOY, _nanodeploy),
    (EngineType.VLLM, _vllm),
)


def _probe(client: httpx.Client, base: str, probe: Callable[[httpx.Client, str], str | None]) -> str | None:
    import httpx

    try:
        return probe(client, base)
    except httpx.HTTPError:
        return None


def detect(base_url: str, *, timeout: float) -> Detection:
    """Ask the node at ``base_url`` which engine it is (see the module docstring)."""
    import httpx  # as in nodes.engine_client: web workers need not load it until they call this

    with httpx.Client(timeout=timeout, trust_env=False) as client:
        listing: engine_client.ModelList | None = None
        try:
            listing = engine_client.fetch_model_list(base_url, timeout=timeout, client=client)
        except engine_client.EngineUnreachable as exc:
            return Detection(engine_type=None, evidence=str(exc))
        except engine_client.EngineError:
            pass  # it answered, just not with a model list: its other endpoints may still tell
        models = listing.ids if listing is not None else None
        for owner in listing.owned_by if listing is not None else []:
            engine_type = OWNED_BY.get(owner.strip().lower())
            if engine_type is not None:
                endpoints = _vllm_endpoints(client, base_url) if engine_type == EngineType.VLLM else None
                return Detection(engine_type.value, f"GET /v1/models: owned_by {owner!r}", models, endpoints)
        return _by_endpoints(client, base_url, models)


def _vllm_endpoints(client: httpx.Client, base_url: str) -> list[str] | None:
    """What a vLLM server serves, from a ``GET`` per path (step 4); None for its default."""
    import httpx

    def status(path: str) -> int:
        try:
            return client.get(base_url + path).status_code
        except httpx.HTTPError:
            return 0

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="engine-endpoints") as pool:
        statuses = dict(zip(ENDPOINT_PATHS, pool.map(status, ENDPOINT_PATHS.values()), strict=True))
    if any(code not in (404, 405) for code in statuses.values()):
        return None  # not the answers of a FastAPI app: keep the default
    served = sorted(endpoint for endpoint, code in statuses.items() if code == 405)
    return None if not served or set(served) == DEFAULT_ENDPOINTS[EngineType.VLLM] else served


def detect_by_endpoints(base_url: str, *, timeout: float) -> Detection:
    """Only step 2 and 3: what decides when ``owned_by`` does not."""
    import httpx

    with httpx.Client(timeout=timeout, trust_env=False) as client:
        return _by_endpoints(client, base_url, None)


def _by_endpoints(client: httpx.Client, base_url: str, models: list[str] | None) -> Detection:
    with ThreadPoolExecutor(max_workers=len(PROBES), thread_name_prefix="engine-detect") as pool:
        answers = list(pool.map(lambda item: _probe(client, base_url, item[1]), PROBES))
    for (engine_type, _), evidence in zip(PROBES, answers, strict=True):
        if evidence is not None:
            return Detection(str(engine_type), evidence, models)
    return Detection(EngineType.OPENAI.value, "no engine-specific endpoint answered: a plain OpenAI server", models)


@dataclass(frozen=True)
class EngineTypeChoice:
    """The engine type to store for a node, and what to record about how it was chosen."""

    engine_type: str
    detection: dict[str, str]  # stored as the node's metadata["engine_detection"]
    models: list[str] | None = None
    unreachable: bool = False
    endpoints: list[str] | None = None  # to store as Node.endpoints (None: keep them)

    @property
    def pending(self) -> bool:
        return self.detection.get("status") == PENDING


def choose_engine_type(url: str, *, fallback: str, timeout: float) -> EngineTypeChoice:
    """Detect the engine type of the node at ``url``; ``fallback`` (marked pending) when it does not
    answer."""
    found = detect(url, timeout=timeout)
    if found.engine_type is not None:
        detection = {"status": DETECTED, "evidence": found.evidence}
        return EngineTypeChoice(found.engine_type, detection, found.models, endpoints=found.endpoints)
    evidence = f"{found.evidence}; {fallback} until the node answers"
    return EngineTypeChoice(fallback, {"status": PENDING, "evidence": evidence}, unreachable=True)


def with_detection(metadata: dict[str, Any], choice: EngineTypeChoice | None) -> dict[str, Any]:
    """``metadata`` recording ``choice``; without a choice (the caller gave the type) the record of
    an earlier detection is dropped."""
    updated = {k: v for k, v in metadata.items() if k != DETECTION_KEY}
    if choice is not None:
        updated[DETECTION_KEY] = choice.detection
    return updated


def detection_pending(metadata: dict[str, Any]) -> bool:
    record = metadata.get(DETECTION_KEY)
    return isinstance(record, dict) and record.get("status") == PENDING
