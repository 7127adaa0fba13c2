"""REST API views: thin interfaces over the selectors (querysets) and the services."""

from __future__ import annotations

from typing import Any

import django_filters
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.db.models import Model, Q, QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, mixins, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from nodes import services
from nodes.choices import ChangeVia, EngineType, NodeHealth, NodeRole, NodeSource, NodeState
from nodes.live import health as live_health
from nodes.live.connection import client as redis_client
from nodes.models import ApiKey, ChangeRecord, ControlPlane, ModelAlias, Node, RoutePolicy

from . import serializers as s
from .exceptions import validation_detail


def _actor(request: Request) -> services.Actor:
    return services.Actor.for_user(request.user, ChangeVia.API)


class PreconditionFailed(exceptions.APIException):
    status_code = 412
    default_detail = "The resource changed since you read it."
    default_code = "precondition_failed"


def _if_match(request: Request) -> list[str] | None:
    """The versions an ``If-Match`` header lists (quotes and ``W/`` removed), or ``None`` without one."""
    header = request.headers.get("If-Match")
    if header is None:
        return None
    return [item.strip().removeprefix("W/").strip('"') for item in header.split(",") if item.strip()]


def _with_etag(response: Response, obj: Model) -> Response:
    response["ETag"] = f'"{services.row_version(obj)}"'
    return response


class ServiceModelViewSet(viewsets.ModelViewSet):
    """A model's viewset whose deletes go through the entity's service (``services.<entity>_delete``),
    so the deletion is audited and bumps the configuration version; its serializer does the same for
    creates and updates (``serializers.ServiceModelSerializer``).

    A single object's ``GET`` answers its version as the ``ETag``. ``PUT`` and ``PATCH`` run in one
    transaction against the row read again under its lock, so a partial update changes only what it
    sends; with ``If-Match`` they are refused (412) when the row is no longer at that version
    (``nodes.services.concurrency``)."""

    entity: str

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        instance = self.get_object()
        return _with_etag(Response(self.get_serializer(instance).data), instance)

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        partial = kwargs.pop("partial", False)
        expected = _if_match(request)
        with transaction.atomic():
            self._locking = True
            instance = self.get_object()
            if expected is not None:
                try:
                    services.check_version(instance, expected)
                except services.StaleWrite as exc:
                    raise PreconditionFailed(str(exc)) from None
            serializer = self.get_serializer(instance, data=request.data, partial=partial)
            serializer.is_valid(raise_exception=True)
            self.perform_update(serializer)
            self._locking = False
        saved = type(instance)._default_manager.get(pk=instance.pk)
        return _with_etag(Response(self.get_serializer(saved).data), saved)

    def get_queryset(self) -> QuerySet:
        queryset = super().get_queryset()
        if getattr(self, "_locking", False):
            # of=("self",): PostgreSQL cannot lock the nullable side of an outer join (an alias's node).
            return queryset.select_for_update(of=("self",))
        return queryset

    def perform_destroy(self, instance: Model) -> None:
        delete = services.entity_service(self.entity, "delete")
        try:
            delete(**{self.entity: instance}, actor=_actor(self.request))
        except DjangoValidationError as exc:
            raise serializers.ValidationError(validation_detail(exc)) from None


class NodeFilter(django_filters.FilterSet):
    role = django_filters.ChoiceFilter(choices=NodeRole.choices)
    state = django_filters.ChoiceFilter(choices=NodeState.choices)
    health = django_filters.ChoiceFilter(choices=NodeHealth.choices)
    engine_type = django_filters.ChoiceFilter(choices=EngineType.choices)
    source = django_filters.ChoiceFilter(choices=NodeSource.choices)
    model = django_filters.CharFilter(method="filter_model", label="Serves this model (name or alias)")
    url = django_filters.CharFilter(lookup_expr="icontains")

    class Meta:
        model = Node
        fields = ["role", "state", "health", "engine_type", "source", "control_plane", "model", "url"]

    def filter_model(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        served = set(ModelAlias.objects.filter(node__isnull=True, name=value).values_list("served_name", flat=True))
        served.add(value)
        return queryset.filter(Q(aliases__served_name__in=served) | Q(aliases__name=value)).distinct()


class NodeViewSet(ServiceModelViewSet):
    """Inference nodes. Reads need a login; writes need a staff account."""

    entity = "node"
    queryset = Node.objects.prefetch_related("aliases").order_by("url")
    serializer_class = s.NodeSerializer
    filterset_class = NodeFilter

    def get_serializer(self, *args: Any, **kwargs: Any) -> serializers.BaseSerializer:
        """Serializers of nodes to show get their live health, read once for the whole response."""
        instance = args[0] if args else kwargs.get("instance")
        if instance is not None:
            nodes = instance if isinstance(instance, list | QuerySet) else [instance]
            ids = [node.pk for node in nodes if isinstance(node, Node) and node.pk]
            kwargs["context"] = {
                **self.get_serializer_context(),
                "health": live_health.read_records_sync(redis_client(), ids) or {},
            }
        return super().get_serializer(*args, **kwargs)

    def perform_create(self, serializer: serializers.BaseSerializer) -> None:
        """Create, then probe the node at once: it takes traffic after its first good probe."""
        node = serializer.save()
        if settings.ROUTERPANEL_HEALTH_PROBE_ON_REGISTER:
            report = services.health_check_nodes(node_ids=[node.pk])
            serializer.context["health"] = report.records  # the answer shows what the probe found

    def _state_action(self, request: Request, service: services.NodeAction) -> Response:
        node = service(node=self.get_object(), actor=_actor(request))
        return Response(self.get_serializer(node).data)

    @extend_schema(request=None, responses=s.NodeSerializer)
    @action(detail=True, methods=["post"])
    def drain(self, request: Request, pk: str | None = None) -> Response:
        """Stop sending new requests to the node; requests in flight finish."""
        return self._state_action(request, services.node_drain)

    @extend_schema(request=None, responses=s.NodeSerializer)
    @action(detail=True, methods=["post"])
    def enable(self, request: Request, pk: str | None = None) -> Response:
        """Put the node back into rotation."""
        return self._state_action(request, services.node_enable)

    @extend_schema(request=None, responses=s.NodeSerializer)
    @action(detail=True, methods=["post"])
    def probe(self, request: Request, pk: str | None = None) -> Response:
        """Probe the node's /health now (through the prober when one runs) and apply the health
        hysteresis; returns the node with its live health."""
        node = self.get_object()
        report = services.health_check_nodes(node_ids=[node.pk])
        node.refresh_from_db()
        serializer = self.get_serializer(node)
        serializer.context["health"] = report.records or serializer.context.get("health", {})
        return Response(serializer.data)

    @extend_schema(request=None, responses=s.NodeSerializer)
    @action(detail=True, methods=["post"])
    def approve(self, request: Request, pk: str | None = None) -> Response:
        """Let a pending node (one that joined a control plane whose approval mode is manual) take
        traffic; 400 when the node is not pending."""
        try:
            return self._state_action(request, services.node_approve)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(validation_detail(exc)) from None

    @extend_schema(request=None, responses=s.NodeSerializer)
    @action(detail=True, methods=["post"])
    def disable(self, request: Request, pk: str | None = None) -> Response:
        """Take the node out of rotation."""
        return self._state_action(request, services.node_disable)


class ModelAliasViewSet(ServiceModelViewSet):
    entity = "alias"
    queryset = ModelAlias.objects.select_related("node").order_by("name", "id")
    serializer_class = s.ModelAliasSerializer
    filterset_fields = ["node", "name", "served_name", "origin"]


class RoutePolicyViewSet(ServiceModelViewSet):
    entity = "policy"
    queryset = RoutePolicy.objects.order_by("model")
    serializer_class = s.RoutePolicySerializer
    filterset_fields = ["model", "strategy", "serving_mode", "enabled"]


class ControlPlaneViewSet(ServiceModelViewSet):
    entity = "control_plane"
    queryset = ControlPlane.objects.order_by("name")
    serializer_class = s.ControlPlaneSerializer
    filterset_fields = ["enabled", "kind", "approval_mode", "engine_type", "sync_state", "scope"]

    @extend_schema(
        request=None, responses={200: s.SyncResultSerializer, 409: s.SyncResultSerializer, 502: s.SyncResultSerializer}
    )
    @action(detail=True, methods=["post"])
    def sync(self, request: Request, pk: str | None = None) -> Response:
        """Mirror this control plane's registry now: 200 when it synced, 409 when another sync is
        running, 502 when the registry could not be listed (no node was changed)."""
        result = services.registry_sync(control_plane_id=self.get_object().pk)
        code = 200 if result.ok else 409 if result.skipped else 502
        return Response(s.SyncResultSerializer(result).data, status=code)

    @extend_schema(methods=["POST"], request=None, responses=s.ControlPlaneSerializer)
    @extend_schema(methods=["DELETE"], request=None, responses={204: None})
    @action(detail=True, methods=["post", "delete"], url_path="registration-token")
    def registration_token(self, request: Request, pk: str | None = None) -> Response:
        """POST issues a new registration token (the old one stops working) and answers it, with
        the registration URL to give engines, in this response only. DELETE revokes it. Nodes
        already registered stay either way."""
        control_plane = self.get_object()
        if request.method == "DELETE":
            services.control_plane_revoke_token(control_plane=control_plane, actor=_actor(request))
            return Response(status=204)
        control_plane.issued_token = services.control_plane_issue_token(
            control_plane=control_plane, actor=_actor(request)
        )
        return Response(self.get_serializer(control_plane).data)


class ApiKeyViewSet(ServiceModelViewSet):
    """Proxy API keys. The plaintext key is in the create response only; just a hash is stored."""

    entity = "api_key"
    queryset = ApiKey.objects.order_by("name", "id")
    serializer_class = s.ApiKeySerializer
    filterset_fields = ["is_active", "name"]


class ChangeRecordViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """The audit trail: every change made through the API, the DLRouter endpoints, the admin or a service."""

    queryset = ChangeRecord.objects.all()
    serializer_class = s.ChangeRecordSerializer
    filterset_fields = ["via", "action", "object_type", "object_id", "actor_label"]
