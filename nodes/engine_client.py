"""The control side's HTTP calls to an engine node (not the data path): read its served models and
ask it to terminate. Every call has a timeout; failures raise ``EngineError`` with a message fit for
an operator (``EngineUnreachable`` when nothing answered at all).

httpx is imported inside the functions that use it: every web worker loads this module (the admin
and the API do), the data path never calls it, and httpx with its dependencies costs a worker
~18 MB of memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx


class EngineError(Exception):
    """The node could not be reached or answered something unusable."""


class EngineUnreachable(EngineError):
    """Nothing answered: refused, timed out, or the host does not resolve."""


@dataclass(frozen=True)
class ModelList:
    """What a node's ``GET /v1/models`` lists: the model ids, and who each says owns it."""

    ids: list[str]
    owned_by: list[str]


def fetch_model_list(base_url: str, *, timeout: float, client: httpx.Client | None = None) -> ModelList:
    """The node's ``/v1/models`` (OpenAI list shape); ``EngineError`` when it is not one."""
    import httpx  # see the module docstring

    try:
        if client is None:
            response = httpx.get(f"{base_url}/v1/models", timeout=timeout)
        else:
            response = client.get(f"{base_url}/v1/models")
    except httpx.HTTPError as exc:
        raise EngineUnreachable(f"could not reach {base_url}/v1/models: {exc.__class__.__name__}: {exc}") from None
    if response.status_code != 200:
        raise EngineError(f"{base_url}/v1/models answered HTTP {response.status_code}")
    try:
        data = response.json().get("data")
        items = [item for item in data if isinstance(item, dict)]
    except (ValueError, AttributeError, TypeError):
        raise EngineError(f"{base_url}/v1/models did not return an OpenAI model list") from None
    ids = [item["id"] for item in items if isinstance(item.get("id"), str) and item["id"]]
    owned_by = [item["owned_by"] for item in items if isinstance(item.get("owned_by"), str)]
    return ModelList(ids=ids, owned_by=owned_by)


def fetch_served_models(base_url: str, *, timeout: float) -> list[str]:
    """The model ids a node lists at ``/v1/models`` (OpenAI list shape)."""
    models = fetch_model_list(base_url, timeout=timeout).ids
    if not models:
        raise EngineError(f"{base_url}/v1/models lists no models")
    return models


def terminate(base_url: str, *, timeout: float) -> None:
    """Ask the node to shut down (``GET {node}/terminate``, as DLRouter does)."""
    import httpx  # see the module docstring

    try:
        response = httpx.get(f"{base_url}/terminate", headers={"accept": "application/json"}, timeout=timeout)
    except httpx.HTTPError as exc:
        raise EngineError(f"could not reach {base_url}/terminate: {exc.__class__.__name__}: {exc}") from None
    if response.status_code != 200:
        raise EngineError(f"{base_url}/terminate answered HTTP {response.status_code}")
