"""The dlslime-ctrl (NanoCtrl) client and its typed payloads.

NanoCtrl speaks JSON over POST. ``/list_entities`` must always carry ``entity_type``: an unscoped
list without it returns every scope's entities. Events are published on Redis channel
``[scope:]nano_events:service_update``: ADD carries the entity as ``payload``; REMOVE only ids.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from .choices import NodeRole
from .masking import mask_credentials

ENTITY_TYPE = "service"


class RegistryError(Exception):
    """The registry could not be listed; the sync must change nothing."""


@dataclass(frozen=True)
class RegistryEntity:
    """One engine as the registry lists it."""

    entity_id: str
    kind: str
    host: str
    port: int
    protocol: str = "http"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{self.protocol}://{host}:{self.port}"

    @property
    def role(self) -> str:
        value = str(self.metadata.get("role") or NodeRole.HYBRID).lower()
        return value if value in NodeRole.values else NodeRole.HYBRID

    @property
    def model_path(self) -> str:
        return str(self.metadata.get("model_path") or "").rstrip("/")

    @property
    def served_model_name(self) -> str:
        """``served_model_name``, defaulting (like ``nanodeploy serve``) to the model path's basename."""
        name = str(self.metadata.get("served_model_name") or "").strip()
        return name or posixpath.basename(self.model_path)


def parse_entity(payload: Any) -> RegistryEntity:
    """Build an entity from a listing item or an ADD event's ``payload``; ``ValueError`` if unusable."""
    if not isinstance(payload, dict):
        raise ValueError("entity is not an object")
    entity_id = payload.get("entity_id") or payload.get("id")
    endpoint = payload.get("endpoint") or {}
    metadata = payload.get("metadata") or {}
    if not isinstance(entity_id, str) or not entity_id:
        raise ValueError("entity has no entity_id")
    if not isinstance(endpoint, dict) or not isinstance(metadata, dict):
        raise ValueError(f"entity {entity_id}: endpoint and metadata must be objects")
    host = endpoint.get("host") or metadata.get("host")
    raw_port: Any = endpoint.get("port") or metadata.get("port")  # any JSON value; int() judges it
    protocol = str(endpoint.get("protocol") or "http").lower()
    if not isinstance(host, str) or not host:
        raise ValueError(f"entity {entity_id}: no endpoint host")
    try:
        port = int(raw_port)
    except (TypeError, ValueError):
        raise ValueError(f"entity {entity_id}: no valid endpoint port") from None
    if not 0 < port < 65536 or protocol not in {"http", "https"}:
        raise ValueError(f"entity {entity_id}: endpoint {protocol}://{host}:{port} is not usable")
    return RegistryEntity(
        entity_id=entity_id,
        kind=str(payload.get("kind") or ""),
        host=host,
        port=port,
        protocol=protocol,
        metadata=metadata,
    )


@dataclass(frozen=True)
class RegistryEvent:
    """A change announced on the registry's Redis channel."""

    event_type: str  # "ADD" or "REMOVE"
    entity_id: str
    kind: str
    entity: RegistryEntity | None  # present for ADD


def parse_event(raw: bytes | str) -> RegistryEvent:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("event is not JSON") from None
    if not isinstance(data, dict) or data.get("entity_type", ENTITY_TYPE) != ENTITY_TYPE:
        raise ValueError("not a service event")
    event_type = str(data.get("event_type") or "").upper()
    entity_id = data.get("entity_id")
    if event_type not in {"ADD", "REMOVE"} or not isinstance(entity_id, str):
        raise ValueError(f"unknown event {data.get('event_type')!r}")
    entity = parse_entity(data.get("payload")) if event_type == "ADD" else None
    kind = str(data.get("kind") or (entity.kind if entity else ""))
    return RegistryEvent(event_type=event_type, entity_id=entity_id, kind=kind, entity=entity)


def event_channel(scope: str) -> str:
    return f"{scope}:nano_events:service_update" if scope else "nano_events:service_update"


def base_url(address: str) -> str:
    address = address.strip().rstrip("/")
    return address if address.startswith(("http://", "https://")) else f"http://{address}"


class NanoCtrlClient:
    """Reads the registry. Every call has a timeout; any failure raises ``RegistryError``."""

    def __init__(self, address: str, *, timeout: float = 5.0) -> None:
        self.base = base_url(address)
        self.shown = mask_credentials(self.base)  # for messages: the address may carry a password
        self.timeout = timeout

    def list_entities(self, *, kind: str, scope: str) -> tuple[list[RegistryEntity], list[str]]:
        """The entities of ``kind`` in ``scope``, and messages for those that could not be used."""
        import httpx  # only the sync calls NanoCtrl; web workers need not pay httpx's memory

        body: dict[str, Any] = {"entity_type": ENTITY_TYPE, "kind": kind}
        if scope:
            body["scope"] = scope
        try:
            response = httpx.post(f"{self.base}/list_entities", json=body, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise RegistryError(
                f"NanoCtrl at {self.shown} is unreachable: {exc.__class__.__name__}: {mask_credentials(str(exc))}"
            ) from None
        if response.status_code != 200:
            raise RegistryError(f"NanoCtrl at {self.shown} answered HTTP {response.status_code} to list_entities")
        try:
            data = response.json()
        except ValueError:
            raise RegistryError(f"NanoCtrl at {self.shown} answered list_entities with something not JSON") from None
        if not isinstance(data, dict) or data.get("status") != "ok" or not isinstance(data.get("entities"), list):
            raise RegistryError(f"NanoCtrl at {self.shown} refused list_entities: {str(data)[:300]}")
        entities: list[RegistryEntity] = []
        problems: list[str] = []
        for item in data["entities"]:
            try:
                entities.append(parse_entity(item))
            except ValueError as exc:
                problems.append(str(exc))
        return entities, problems
