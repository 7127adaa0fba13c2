"""DLRouter-compatible node management: ``/nodes/status``, ``/add``, ``/remove``, ``/terminate``,
``/terminate_all``.

Same paths and success bodies as DLRouter, so existing scripts and self-registering engines keep
working. Unlike DLRouter, failures are HTTP errors (4xx for bad requests, 502 when the node itself
fails) with ``{"error": message}``, never a 200. Bodies are read as JSON whatever the
Content-Type, because DLRouter's users post with ``curl -d`` and no header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from nodes import engine_client, services
from nodes.choices import ChangeVia, EngineType, NodeRole, NodeSource, NodeState
from nodes.engine_detect import EngineTypeChoice, choose_engine_type, with_detection
from nodes.models import Node
from nodes.networks import is_unspecified, normalize_node_url, parse_address, url_host, with_host
from nodes.validators import clean_model_names, load_json


class CompatError(exceptions.APIException):
    status_code: int = status.HTTP_400_BAD_REQUEST


def compat_error(message: str, code: int) -> CompatError:
    exc = CompatError(message)
    exc.status_code = code
    return exc


class CompatView(APIView):
    """Base: errors rendered as DLRouter's ``{"error": "..."}`` with a proper status."""

    parser_classes: list = []  # the raw body is read in ``json_body``

    def handle_exception(self, exc: Exception) -> Response:
        response = super().handle_exception(exc)
        if isinstance(response.data, dict) and "detail" in response.data:
            response.data = {"error": str(response.data["detail"])}
        return response

    def actor(self) -> services.Actor:
        return services.Actor.for_user(self.request.user, ChangeVia.COMPAT)

    def json_body(self) -> dict[str, Any]:
        try:
            body = load_json(self.request.body or b"null")
        except ValueError as exc:  # UnicodeDecodeError is one
            raise compat_error(f"The request body is not valid JSON: {exc}.", 400) from None
        if not isinstance(body, dict):
            raise compat_error("The request body must be a JSON object.", 400)
        return body

    def node_from_body(self) -> Node:
        url = self.normalized_url(self.json_body())
        node = Node.objects.filter(url=url).first()
        if node is None:
            raise compat_error(f"Node {url} is not registered.", 404)
        return node

    @staticmethod
    def normalized_url(body: dict[str, Any]) -> str:
        if "url" not in body:
            raise compat_error("Field 'url' is required.", 400)
        try:
            return normalize_node_url(body["url"])
        except DjangoValidationError as exc:
            raise compat_error(f"Field 'url': {' '.join(exc.messages)}", 400) from None


def peer_address(request: Request) -> str | None:
    """The address the request came from, as the web server saw it (``REMOTE_ADDR``; behind a
    reverse proxy, uvicorn's ``--forwarded-allow-ips`` makes it the client's)."""
    address = parse_address(request.META.get("REMOTE_ADDR") or "")
    return str(address) if address is not None and not address.is_unspecified else None


def dlrouter_status(node: Node) -> dict[str, Any]:
    """A node as DLRouter's ``/nodes/status`` shows it, plus RouterPanel's own fields."""
    return {
        "role": NodeRole(node.role).dlrouter_value(),
        "models": node.served_models,
        "unfinished": 0,
        "latency": [],
        "speed": node.metadata.get("speed"),
        "engine_type": node.engine_type,
        "state": node.state,
        "health": node.health,
    }


class StatusView(CompatView):
    @extend_schema(summary="All nodes and their status, keyed by URL (DLRouter format)", responses=dict)
    def get(self, request: Request) -> Response:
        nodes = Node.objects.exclude(state=NodeState.GONE).prefetch_related("aliases")
        return Response({node.url: dlrouter_status(node) for node in nodes})


@dataclass(frozen=True)
class Registration:
    """A ``/nodes/add`` body, validated (DLRouter's and LMDeploy's ``{"url", "status": {...}}``)."""

    url: str
    role: str
    engine_type: str | None  # None: not given, detect it
    models: list[str]  # empty: ask the node
    speed: float | None


def parse_registration(view: CompatView) -> Registration:
    """Read and validate a ``/nodes/add`` body. A bind address in the URL (``http://0.0.0.0:23333``,
    as LMDeploy sends its ``--server-name`` default) becomes the address the request came from."""
    body = view.json_body()
    url = view.normalized_url(body)
    host = url_host(url)
    if is_unspecified(host):
        peer = peer_address(view.request)
        if peer is None:
            raise compat_error(f"Field 'url': {host} is a bind address and the caller's address is unknown.", 400)
        url = with_host(url, peer)
    node_status = body.get("status") or {}
    if not isinstance(node_status, dict):
        raise compat_error("Field 'status' must be an object.", 400)

    try:
        role = NodeRole.from_dlrouter(node_status.get("role", NodeRole.HYBRID.value))
    except ValueError as exc:
        raise compat_error(f"Field 'status.role': {exc}", 400) from None

    engine_type = body.get("engine_type", node_status.get("engine_type"))
    if engine_type is not None and engine_type not in EngineType.values:
        raise compat_error(f"Field 'engine_type': use one of {', '.join(EngineType.values)}.", 400)

    # The rules every interface applies to model names (nodes.validators), not a looser copy.
    try:
        models = clean_model_names(node_status.get("models") or [])
    except DjangoValidationError as exc:
        raise compat_error(f"Field 'status.models': {' '.join(exc.messages)}", 400) from None

    speed = node_status.get("speed")
    if speed is not None and (isinstance(speed, bool) or not isinstance(speed, int | float) or not 0 <= speed < 1e300):
        raise compat_error("Field 'status.speed' must be a number, 0 or more.", 400)
    return Registration(url=url, role=role.value, engine_type=engine_type, models=models, speed=speed)


def resolve_engine(registration: Registration, *, fallback: str) -> tuple[str, list[str], EngineTypeChoice | None]:
    """The node's engine type (given, else detected from its endpoints, else ``fallback``) and its
    models (given, else what its ``/v1/models`` lists). Blocking, with short timeouts: these views
    are sync Django views, run off the event loop."""
    choice = None
    if registration.engine_type is None:
        choice = choose_engine_type(
            registration.url, fallback=fallback, timeout=settings.ROUTERPANEL_ENGINE_DETECT_TIMEOUT
        )
    engine_type = registration.engine_type or (choice.engine_type if choice else fallback)
    models = registration.models
    if not models:
        if choice is not None and choice.unreachable:
            raise compat_error(f"Failed to add node: no models given and {choice.detection['evidence']}.", 400)
        try:
            models = (choice.models if choice is not None else None) or engine_client.fetch_served_models(
                registration.url, timeout=settings.ROUTERPANEL_NODE_PROBE_TIMEOUT
            )
        except engine_client.EngineError as exc:
            raise compat_error(f"Failed to add node: no models given and {exc}.", 400) from None
    return engine_type, models, choice


class AddView(CompatView):
    @extend_schema(
        summary="Register a node (DLRouter format); asks the node's /v1/models when no models are given "
        "and detects its engine type when none is given",
        request=dict,
        responses=dict,
    )
    def post(self, request: Request) -> Response:
        registration = parse_registration(self)
        url = registration.url
        engine_type, models, choice = resolve_engine(registration, fallback=settings.ROUTERPANEL_DEFAULT_ENGINE_TYPE)

        existing = Node.objects.filter(url=url).first()
        fields: dict[str, Any] = {"role": registration.role, "engine_type": engine_type}
        if existing is None:
            fields["source"] = NodeSource.MANUAL
        metadata = dict(existing.metadata) if existing else {}
        if registration.speed is not None:
            metadata["speed"] = registration.speed
        metadata = with_detection(metadata, choice)
        if choice is not None and choice.endpoints and not (existing and existing.endpoints):
            fields["endpoints"] = choice.endpoints
        if metadata != (existing.metadata if existing else {}):
            fields["metadata"] = metadata
        try:
            node, _ = services.node_upsert(actor=self.actor(), url=url, models=models, **fields)
        except DjangoValidationError as exc:
            raise compat_error(f"Failed to add node: {' '.join(exc.messages)}", 400) from None
        if settings.ROUTERPANEL_HEALTH_PROBE_ON_REGISTER:
            # It takes traffic after its first good probe: probe it now rather than at the prober's leisure.
            services.health_check_nodes(node_ids=[node.pk])
        return Response({"message": "Added successfully."})


class RemoveView(CompatView):
    @extend_schema(summary="Remove a node (DLRouter format)", request=dict, responses=dict)
    def post(self, request: Request) -> Response:
        node = self.node_from_body()
        services.node_delete(node=node, actor=self.actor(), note="removed through /nodes/remove")
        return Response({"message": "Removed successfully."})


def _terminate(node: Node, actor: services.Actor) -> None:
    """Ask the node to shut down, then forget it; a node that refuses stays registered."""
    engine_client.terminate(node.url, timeout=settings.ROUTERPANEL_TERMINATE_TIMEOUT)
    services.node_delete(node=node, actor=actor, note="terminated through /nodes/terminate")


class TerminateView(CompatView):
    @extend_schema(summary="Terminate a node (GET {node}/terminate) and remove it", request=dict, responses=dict)
    def post(self, request: Request) -> Response:
        node = self.node_from_body()
        try:
            _terminate(node, self.actor())
        except engine_client.EngineError as exc:
            raise compat_error(f"Failed to terminate {node.url}: {exc}.", 502) from None
        return Response({"message": "Terminated successfully."})


class TerminateAllView(CompatView):
    @extend_schema(summary="Terminate and remove every node", request=None, responses=dict)
    def post(self, request: Request) -> Response:
        failed: list[str] = []
        for node in Node.objects.exclude(state=NodeState.GONE):
            try:
                _terminate(node, self.actor())
            except engine_client.EngineError:
                failed.append(node.url)
        if failed:
            return Response(
                {"error": "Some nodes failed to terminate.", "failed": failed}, status=status.HTTP_502_BAD_GATEWAY
            )
        return Response({"message": "All nodes terminated."})
