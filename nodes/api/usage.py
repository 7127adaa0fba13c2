"""``GET /api/usage/``: the hourly usage rows (``UsageHour``, rolled up from the web workers' minutes
by ``services.usage_rollup``), filtered and summed: ``since``, ``until``, ``key`` (id or name),
``model``, ``node``, and ``group_by`` (a comma-separated subset of hour, key, model, node: the
columns kept; the others are summed over). See docs/usage.md."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_serializer, inline_serializer
from rest_framework import serializers, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from nodes import selectors


class UsageQuerySerializer(serializers.Serializer):
    since = serializers.DateTimeField(required=False, help_text="Hours that began at or after (ISO 8601).")
    until = serializers.DateTimeField(required=False, help_text="Hours that began before (ISO 8601).")
    key = serializers.CharField(required=False, max_length=100, help_text="The API key's id or name.")
    model = serializers.CharField(required=False, max_length=255, help_text="The model the clients asked for.")
    node = serializers.CharField(required=False, max_length=1000, help_text="The node's URL.")
    group_by = serializers.CharField(
        required=False,
        default=",".join(selectors.USAGE_GROUPS),
        help_text="Comma-separated columns to keep: hour, key, model, node (the rest are summed).",
    )

    def validate_group_by(self, value: str) -> tuple[str, ...]:
        groups = tuple(g.strip() for g in value.split(",") if g.strip())
        unknown = sorted(set(groups) - set(selectors.USAGE_GROUPS))
        if unknown:
            raise serializers.ValidationError(
                f"Unknown column(s) {', '.join(unknown)}; choose from {', '.join(selectors.USAGE_GROUPS)}."
            )
        return groups


# The shape of a row, for the schema ("errors" cannot be a declared field: serializers have an errors).
USAGE_ROW = inline_serializer(
    name="UsageRow",
    fields={
        "hour": serializers.DateTimeField(required=False),
        "key_id": serializers.IntegerField(required=False),
        "key_name": serializers.CharField(required=False),
        "model": serializers.CharField(required=False),
        "node": serializers.CharField(required=False),
        "prompt_tokens": serializers.IntegerField(),
        "completion_tokens": serializers.IntegerField(),
        "total_tokens": serializers.IntegerField(),
        "requests": serializers.IntegerField(),
        "errors": serializers.IntegerField(),
        "mean_ttft_ms": serializers.FloatField(allow_null=True),
    },
)


@extend_schema_serializer(many=False)  # the page itself, though it answers the list action
class UsagePageSerializer(serializers.Serializer):
    results = serializers.ListField(child=USAGE_ROW)


class UsageViewSet(viewsets.ViewSet):
    """Tokens, requests, errors and time to first token per API key, model, node and hour."""

    @extend_schema(parameters=[UsageQuerySerializer], responses=UsagePageSerializer)
    def list(self, request: Request) -> Response:
        query = UsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        return Response({"results": selectors.usage_rows(**query.validated_data)})
