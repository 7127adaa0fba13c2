"""REST API serializers. They validate input and shape output; writes are delegated to services."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, TypeVar

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import FloatField as ModelFloatField
from rest_framework import serializers

from nodes import services
from nodes.choices import ENDPOINTS_HELP, ChangeVia, Endpoint, NodeRole
from nodes.engine_detect import choose_engine_type, with_detection
from nodes.live.health import HealthRecord
from nodes.masking import mask_credentials
from nodes.models import ApiKey, ChangeRecord, ControlPlane, ModelAlias, Node, RoutePolicy
from nodes.networks import validate_node_url
from nodes.validators import MAX_MODELS_PER_NODE, unstorable, validate_model_name

from .exceptions import validation_detail

_T = TypeVar("_T")


def _actor(serializer: serializers.Serializer) -> services.Actor:
    request = serializer.context.get("request")
    return services.Actor.for_user(getattr(request, "user", None), ChangeVia.API)


def _call(service: Callable[..., _T], **kwargs: Any) -> _T:
    """Run a service and turn Django validation errors into DRF ones (400 with the field named)."""
    try:
        return service(**kwargs)
    except DjangoValidationError as exc:
        raise serializers.ValidationError(validation_detail(exc)) from None


class StrictFloatField(serializers.FloatField):
    """A number, not ``true`` (DRF's own reads ``true`` as 1.0), and a finite one."""

    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool):
            self.fail("invalid")
        value = super().to_internal_value(data)
        if unstorable(value) is not None:
            self.fail("invalid")
        return value


class RegistrySerializer(serializers.ModelSerializer):
    """The registry's model serializers: strict numbers."""

    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        ModelFloatField: StrictFloatField,
    }


class ServiceModelSerializer(RegistrySerializer):
    """Creates and updates through the entity's services (``services.<entity>_create`` and
    ``<entity>_update``), so a write through the API is validated, audited and versioned like any other."""

    entity: str

    def create(self, validated_data: dict[str, Any]) -> Any:
        return _call(services.entity_service(self.entity, "create"), actor=_actor(self), **validated_data)

    def update(self, instance: Any, validated_data: dict[str, Any]) -> Any:
        update = services.entity_service(self.entity, "update")
        return _call(update, **{self.entity: instance}, actor=_actor(self), **validated_data)


class StrictJSONObjectField(serializers.JSONField):
    def to_internal_value(self, data: Any) -> Any:
        try:
            value = super().to_internal_value(data)
        except RecursionError:  # a form field's text, parsed here (JSON bodies are parsed by nodes.api.parsers)
            raise serializers.ValidationError("This is nested too deeply.") from None
        if not isinstance(value, dict):
            raise serializers.ValidationError("Expected a JSON object.")
        reason = unstorable(value)
        if reason is not None:
            raise serializers.ValidationError(f"This cannot be stored: {reason}.")
        return value


class ModelNameListField(serializers.ListField):
    """Model names, each checked by ``nodes.validators.validate_model_name`` like every interface's."""

    child = serializers.CharField(
        max_length=255, allow_blank=False, trim_whitespace=True, validators=[validate_model_name]
    )
    max_length = MAX_MODELS_PER_NODE


class NodeAliasSerializer(RegistrySerializer):
    class Meta:
        model = ModelAlias
        fields = ["id", "name", "served_name", "origin"]


class NodeSerializer(RegistrySerializer):
    url = serializers.CharField(max_length=500, help_text="Base URL, e.g. http://10.0.0.5:8000.")
    role = serializers.CharField(default=NodeRole.HYBRID, help_text="hybrid, prefill or decode (DLRouter's 1/2/3 too).")
    models = ModelNameListField(
        required=False, write_only=True, help_text="Model names the node serves; replaces its served-name aliases."
    )
    model_path = serializers.CharField(
        required=False, write_only=True, allow_blank=True, help_text="Model path; its basename becomes an alias too."
    )
    served_models = serializers.SerializerMethodField()
    aliases = NodeAliasSerializer(many=True, read_only=True)
    metadata = StrictJSONObjectField(required=False)
    endpoints = serializers.ListField(
        child=serializers.ChoiceField(choices=Endpoint.choices), required=False, help_text=ENDPOINTS_HELP
    )

    class Meta:
        model = Node
        fields = [
            "id",
            "url",
            "name",
            "engine_type",
            "role",
            "state",
            *Node.READ_ONLY_FIELDS,
            "weight",
            "max_concurrency",
            "bootstrap_port",
            "dp_size",
            "kv_connector_address",
            "metadata",
            "endpoints",
            "health_interval",
            "health_timeout",
            "health_failures",
            "health_successes",
            "models",
            "model_path",
            "served_models",
            "aliases",
            "created_at",
            "updated_at",
        ]
        extra_kwargs = {
            "engine_type": {"help_text": "Detected from the node's own endpoints when not given."},
        }
        read_only_fields = Node.READ_ONLY_FIELDS

    def get_served_models(self, node: Node) -> list[str]:
        return node.served_models

    def to_representation(self, node: Node) -> dict[str, Any]:
        """The health fields from the live state when it has the node (``context["health"]``, read
        once per response by the view), else as the database last recorded them."""
        data = super().to_representation(node)
        record: HealthRecord | None = (self.context.get("health") or {}).get(node.pk)
        if record is not None:
            data["health"] = record.state
            data["consecutive_failures"] = record.failures
            data["last_checked_at"] = datetime.datetime.fromtimestamp(record.at, tz=datetime.UTC).isoformat()
        return data

    def validate_url(self, value: str) -> str:
        """Checked before the node's engine is asked its type, and kept as written: the model stores
        it in its one spelling and, when another node has that, names the node and the spelling."""
        try:
            validate_node_url(value)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from None
        return value

    def validate_role(self, value: Any) -> str:
        try:
            return NodeRole.from_dlrouter(value).value
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def create(self, validated_data: dict[str, Any]) -> Node:
        models = validated_data.pop("models", [])
        model_path = validated_data.pop("model_path", "")
        if "engine_type" not in validated_data:
            # Not given: what the node's own endpoints show (nodes.engine_detect), else the default.
            choice = choose_engine_type(
                validate_node_url(validated_data["url"]),
                fallback=settings.ROUTERPANEL_DEFAULT_ENGINE_TYPE,
                timeout=settings.ROUTERPANEL_ENGINE_DETECT_TIMEOUT,
            )
            validated_data["engine_type"] = choice.engine_type
            validated_data["metadata"] = with_detection(validated_data.get("metadata") or {}, choice)
            if choice.endpoints and "endpoints" not in validated_data:
                validated_data["endpoints"] = choice.endpoints
        return _call(services.node_create, actor=_actor(self), models=models, model_path=model_path, **validated_data)

    def update(self, node: Node, validated_data: dict[str, Any]) -> Node:
        models = validated_data.pop("models", None)
        model_path = validated_data.pop("model_path", "")
        actor = _actor(self)
        node = _call(services.node_update, node=node, actor=actor, **validated_data)
        if models is not None:
            _call(services.node_set_models, node=node, actor=actor, models=models, model_path=model_path)
        return node


class ModelAliasSerializer(ServiceModelSerializer):
    entity = "alias"

    class Meta:
        model = ModelAlias
        fields = ["id", "node", "name", "served_name", "origin", "created_at"]
        validators: list = []  # uniqueness is checked by the model's constraints in the service


class RoutePolicySerializer(ServiceModelSerializer):
    entity = "policy"

    class Meta:
        model = RoutePolicy
        fields = [
            "id",
            "model",
            "strategy",
            "serving_mode",
            "retry_budget",
            "connect_timeout",
            "first_token_timeout",
            "total_timeout",
            "prefix_min_match",
            "prefix_load_factor",
            "panic_threshold",
            "enabled",
            "created_at",
            "updated_at",
        ]


class ControlPlaneSerializer(ServiceModelSerializer):
    entity = "control_plane"
    kinds = ModelNameListField(required=False, help_text='Entity kinds to import, e.g. ["nanodeploy", "dlengine"].')
    allowed_networks = serializers.ListField(
        child=serializers.CharField(max_length=64),
        required=False,
        help_text='Networks new nodes must be in, e.g. ["10.0.0.0/8"]; empty allows any address.',
    )
    registration_token = serializers.SerializerMethodField(
        help_text="The registration token: in the response that issued it only (it is stored hashed)."
    )
    registration_url = serializers.SerializerMethodField(
        help_text="What to give an engine as its --proxy-url: in the response that issued the token only."
    )

    def get_registration_token(self, control_plane: ControlPlane) -> str | None:
        return getattr(control_plane, "issued_token", None)

    def get_registration_url(self, control_plane: ControlPlane) -> str | None:
        token = getattr(control_plane, "issued_token", None)
        request = self.context.get("request")
        if token is None or request is None:
            return None
        return request.build_absolute_uri(f"/register/{token}")

    class Meta:
        model = ControlPlane
        fields = [
            "id",
            "name",
            "kind",
            "address",
            "scope",
            "kinds",
            "engine_type",
            "sync_interval",
            "redis_url",
            "enabled",
            "approval_mode",
            "allowed_networks",
            "registration_token_prefix",
            "registration_token",
            "registration_url",
            "health_interval",
            "health_timeout",
            "health_failures",
            "health_successes",
            "sync_state",
            "last_sync_at",
            "last_sync_duration_ms",
            "last_sync_counts",
            "last_sync_error",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ControlPlane.READ_ONLY_FIELDS

    SECRET_FIELDS = ("redis_url", "address")

    def to_representation(self, control_plane: ControlPlane) -> dict[str, Any]:
        """Staff see the URLs they edit; other readers see them with passwords masked."""
        data = super().to_representation(control_plane)
        request = self.context.get("request")
        if not getattr(getattr(request, "user", None), "is_staff", False):
            for name in self.SECRET_FIELDS:
                if data.get(name):
                    data[name] = mask_credentials(data[name])
        return data


class ApiKeySerializer(ServiceModelSerializer):
    entity = "api_key"
    allowed_models = ModelNameListField(required=False, help_text="Models this key may use; empty for all.")
    key = serializers.SerializerMethodField(help_text="The plaintext key: returned once, in the create response.")

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "name",
            "key",
            "prefix",
            "allowed_models",
            *ApiKey.LIMIT_FIELDS,
            "is_active",
            "created_by",
            "created_at",
            "last_used_at",
        ]
        read_only_fields = ["prefix", "created_by", "created_at", "last_used_at"]

    # The plaintext of the key this serializer has just created: shown in that response only.
    _plaintext: str | None = None

    def get_key(self, key: ApiKey) -> str | None:
        return self._plaintext if key is self.instance else None

    def create(self, validated_data: dict[str, Any]) -> ApiKey:
        key, self._plaintext = _call(services.api_key_create, actor=_actor(self), **validated_data)
        return key


class ChangeRecordSerializer(serializers.ModelSerializer):
    class Meta:
        model = ChangeRecord
        fields = [
            "id",
            "created_at",
            "actor_label",
            "via",
            "action",
            "object_type",
            "object_id",
            "object_repr",
            "changes",
            "note",
        ]


class SyncResultSerializer(serializers.Serializer):
    """What one registry sync did (see ``nodes.services.SyncResult``)."""

    control_plane_id = serializers.IntegerField()
    ok = serializers.BooleanField()
    skipped = serializers.BooleanField()
    reason = serializers.CharField()
    listed = serializers.IntegerField()
    created = serializers.IntegerField()
    updated = serializers.IntegerField()
    revived = serializers.IntegerField()
    gone = serializers.IntegerField()
    unchanged = serializers.IntegerField()
    conflicts = serializers.IntegerField()
    invalid = serializers.IntegerField()
    refused = serializers.IntegerField()
    duration_ms = serializers.IntegerField()
    problems = serializers.ListField(child=serializers.CharField())
