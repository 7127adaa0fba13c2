"""DLRouter-compatible node management: ``/nodes/status``, ``/add``, ``/remove``, ``/terminate``,
``/terminate_all``.

Same paths and success bodies as DLRouter, so existing scripts and self-registering engines keep
working. Unlike DLRouter, failures are HTTP errors (4xx for bad requests, 502 when the node itself
fails) with ``{"error": message}``, never a 200. Bodies are read as JSON whatever the
Content-Type, because DLRouter's users post with ``curl -d`` and no header.
"""

from __future__ import annotations

import json
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
from nodes.models import Node, normalize_node_url


class CompatError(exceptions.APIException):
    status_code = status.HTTP_400_BAD_REQUEST


def _error(message: str, code: int) -> CompatError:
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
            body = json.loads(self.request.body or b"null")
        except (ValueError, UnicodeDecodeError):
            raise _error("The request body is not valid JSON.", 400) from None
        if not isinstance(body, dict):
            raise _error("The request body must be a JSON object.", 400)
        return body

    def node_from_body(self) -> Node:
        url = self.normalized_url(self.json_body())
        node = Node.objects.filter(url=url).first()
        if node is None:
            raise _error(f"Node {url} is not registered.", 404)
        return node

    @staticmethod
    def normalized_url(body: dict[str, Any]) -> str:
        if "url" not in body:
            raise _error("Field 'url' is required.", 400)
        try:
            return normalize_node_url(body["url"])
        except DjangoValidationError as exc:
            raise _error(f"Field 'url': {' '.join(exc.messages)}", 400) from None


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


class AddView(CompatView):
    @extend_schema(
        summary="Register a node (DLRouter format); asks the node's /v1/models when no models are given",
        request=dict,
        responses=dict,
    )
    def post(self, request: Request) -> Response:
        body = self.json_body()
        url = self.normalized_url(body)
        node_status = body.get("status") or {}
        if not isinstance(node_status, dict):
            raise _error("Field 'status' must be an object.", 400)

        try:
            role = NodeRole.from_dlrouter(node_status.get("role", NodeRole.HYBRID.value))
        except ValueError as exc:
            raise _error(f"Field 'status.role': {exc}", 400) from None

        engine_type = body.get("engine_type", node_status.get("engine_type", settings.ROUTERPANEL_DEFAULT_ENGINE_TYPE))
        if engine_type not in EngineType.values:
            raise _error(f"Field 'engine_type': use one of {', '.join(EngineType.values)}.", 400)

        models = node_status.get("models") or []
        if not isinstance(models, list) or not all(isinstance(m, str) and m.strip() for m in models):
            raise _error("Field 'status.models' must be a list of model names.", 400)
        if not models:
            try:
                models = engine_client.fetch_served_models(url, timeout=settings.ROUTERPANEL_NODE_PROBE_TIMEOUT)
            except engine_client.EngineError as exc:
                raise _error(f"Failed to add node: no models given and {exc}.", 400) from None

        speed = node_status.get("speed")
        if speed is not None and (isinstance(speed, bool) or not isinstance(speed, int | float)):
            raise _error("Field 'status.speed' must be a number.", 400)

        existing = Node.objects.filter(url=url).first()
        fields: dict[str, Any] = {"role": role, "engine_type": engine_type}
        if existing is None:
            fields["source"] = NodeSource.MANUAL
        if speed is not None:
            fields["metadata"] = {**(existing.metadata if existing else {}), "speed": speed}
        try:
            services.node_upsert(actor=self.actor(), url=url, models=models, **fields)
        except DjangoValidationError as exc:
            raise _error(f"Failed to add node: {' '.join(exc.messages)}", 400) from None
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
            raise _error(f"Failed to terminate {node.url}: {exc}.", 502) from None
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
