"""``/api/requests/``: the request explanations (read-only), newest first, with the filters of the
dashboard's Requests page, and one request's record at ``/api/requests/<request id>/``.

The records live in Redis (``nodes.live.explain_store``), not in the database: paging is by cursor
(the last entry of the previous page) rather than by offset, and a page may hold fewer than
``limit`` records when the filter rarely matches, with a ``next`` link to go on. Redis being
unreachable is a 503.
"""

from __future__ import annotations

import datetime
from typing import Any

from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_serializer
from redis.exceptions import RedisError
from rest_framework import exceptions, serializers, viewsets
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.urls import replace_query_param

from nodes.choices import ExclusionReason, NodeRole, ServingMode
from nodes.live import explain_store
from nodes.live.connection import client as redis_client

PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


class LiveStateUnavailable(exceptions.APIException):
    status_code = 503
    default_detail = "The request explanations cannot be read: Redis is unreachable."
    default_code = "live_state_unavailable"


# -- Query ---------------------------------------------------------------------------------------


class RequestQuerySerializer(serializers.Serializer):
    model = serializers.CharField(required=False, max_length=500, help_text="The model the client asked for.")
    node = serializers.IntegerField(required=False, min_value=1, help_text="A node picked for it or tried (id).")
    key = serializers.CharField(required=False, max_length=500, help_text="The API key's name.")
    status = serializers.RegexField(
        r"^([1-5][0-9][0-9]|[1-5]xx|error)$",
        required=False,
        help_text="An HTTP status (`503`), a class (`5xx`), or `error` (4xx, 5xx, or no answer).",
    )
    since = serializers.DateTimeField(required=False, help_text="Arrived at or after (ISO 8601).")
    until = serializers.DateTimeField(required=False, help_text="Arrived at or before (ISO 8601).")
    cursor = serializers.RegexField(
        r"^[0-9]{1,20}-[0-9]{1,20}$", required=False, help_text="Older than this entry: the previous page's `next`."
    )
    limit = serializers.IntegerField(required=False, min_value=1, max_value=MAX_PAGE_SIZE, default=PAGE_SIZE)

    def validate_cursor(self, value: str) -> str:
        if any(int(part) >= 2**64 for part in value.split("-")):
            raise serializers.ValidationError("Not a cursor this API gave.")
        return value

    def wanted(self) -> explain_store.RequestFilter:
        data = self.validated_data

        def unix(value: datetime.datetime | None) -> float | None:
            return None if value is None else value.timestamp()

        return explain_store.RequestFilter(
            model=data.get("model"),
            node=data.get("node"),
            key=data.get("key"),
            status=data.get("status"),
            since=unix(data.get("since")),
            until=unix(data.get("until")),
        )


# -- The record (for output and the OpenAPI schema; ``nodes.live.explain.Record`` is its shape) ---


class NodeRefSerializer(serializers.Serializer):
    node = serializers.IntegerField()
    url = serializers.CharField()


class CandidateSerializer(serializers.Serializer):
    node = serializers.IntegerField()
    url = serializers.CharField()
    inflight = serializers.IntegerField(help_text="Requests in flight on it, every web worker's, as the strategy saw.")
    weight = serializers.IntegerField()
    latency_ms = serializers.FloatField(allow_null=True, help_text="Its moving-average latency; null before a sample.")
    prefix_match = serializers.IntegerField(
        allow_null=True, help_text="Prompt characters its prefix cache is known to hold (prefix_cache only)."
    )


class ExclusionSerializer(serializers.Serializer):
    reason = serializers.ChoiceField(choices=ExclusionReason.choices)
    count = serializers.IntegerField()
    nodes = NodeRefSerializer(many=True, help_text="The first few; `count` has them all.")


class ChoiceSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=NodeRole.choices)
    in_rotation = serializers.IntegerField(help_text="The route's nodes of this role in rotation.")
    available = serializers.IntegerField(help_text="Of them, free to take this request.")
    pick = NodeRefSerializer(allow_null=True)
    served_name = serializers.CharField(allow_null=True, help_text="The model name sent to the pick.")
    candidates = CandidateSerializer(many=True, help_text="The pick first, then the next few.")
    excluded = ExclusionSerializer(many=True)


class AttemptSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=NodeRole.choices)
    node = serializers.IntegerField()
    url = serializers.CharField()
    started_ms = serializers.FloatField(help_text="After the request arrived.")
    duration_ms = serializers.FloatField()
    status = serializers.IntegerField(help_text="The engine's status; 0 when none arrived.")
    error = serializers.CharField(allow_null=True, help_text="Why there was no answer: unreachable, timeout...")
    ttft_ms = serializers.FloatField(allow_null=True)
    verdict = serializers.BooleanField(allow_null=True, help_text="The circuit breaker's verdict; null: no say.")
    retry = serializers.CharField(allow_null=True, help_text="For a retry: how the previous attempt of its role ended.")


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField(allow_null=True)
    completion_tokens = serializers.IntegerField(allow_null=True)
    total_tokens = serializers.IntegerField(allow_null=True)


class PairSerializer(serializers.Serializer):
    prefill = NodeRefSerializer(allow_null=True)
    decode = NodeRefSerializer(allow_null=True)


class RequestRecordSerializer(serializers.Serializer):
    id = serializers.CharField(help_text="The request id (X-Request-Id).")
    entry = serializers.CharField(help_text="The record's place in the store.")
    at = serializers.DateTimeField(help_text="When the request arrived.")
    key = serializers.CharField(allow_null=True)
    model = serializers.CharField()
    path = serializers.CharField()
    stream = serializers.BooleanField()
    mode = serializers.ChoiceField(choices=ServingMode.choices, allow_null=True)
    policy = serializers.CharField(allow_null=True, help_text='The route policy\'s model; "" is the default policy.')
    strategy = serializers.CharField(allow_null=True)
    choices = ChoiceSerializer(many=True, help_text="Each time the router chose a node: the first, and each retry.")
    attempts = AttemptSerializer(many=True)
    retries = serializers.IntegerField()
    node = NodeRefSerializer(allow_null=True, help_text="The node whose answer (or failure) ended the request.")
    pair = PairSerializer(allow_null=True, help_text="A PD request's prefill and decode nodes.")
    ttfb_ms = serializers.FloatField(allow_null=True)
    total_ms = serializers.FloatField()
    status = serializers.IntegerField()
    error = serializers.CharField(allow_null=True)
    message = serializers.CharField(allow_null=True)
    usage = UsageSerializer(allow_null=True)


@extend_schema_serializer(many=False)  # the page itself, though it answers the list action
class RequestPageSerializer(serializers.Serializer):
    next = serializers.URLField(allow_null=True, help_text="The next (older) page, or null at the end.")
    results = RequestRecordSerializer(many=True)


def _record(record: Any) -> dict[str, Any]:
    return RequestRecordSerializer(record).data


class RequestViewSet(viewsets.ViewSet):
    """Why each proxied request went where it went (or failed): read-only; reads need a login."""

    lookup_value_regex = r"[^/]+"

    @extend_schema(parameters=[RequestQuerySerializer], responses=RequestPageSerializer)
    def list(self, request: Request) -> Response:
        """The newest request explanations matching the filters, newest first."""
        query = RequestQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        try:
            page = explain_store.read_page(
                redis_client(),
                query.wanted(),
                before=query.validated_data.get("cursor"),
                limit=query.validated_data["limit"],
            )
        except (RedisError, OSError) as exc:  # Redis down or timing out: the API says so instead of a 500
            raise LiveStateUnavailable() from exc
        url = request.build_absolute_uri()
        following = replace_query_param(url, "cursor", page.cursor) if page.cursor else None
        return Response({"next": following, "results": [_record(r) for r in page.records]})

    @extend_schema(
        parameters=[OpenApiParameter("id", str, OpenApiParameter.PATH, description="The request id.")],
        responses=RequestRecordSerializer,
    )
    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        """One request's explanation (the newest, if a client reused its request id)."""
        try:
            record = explain_store.find(redis_client(), pk or "")
        except (RedisError, OSError) as exc:
            raise LiveStateUnavailable() from exc
        if record is None:
            raise exceptions.NotFound("No explanation of that request is kept (it may have expired).")
        return Response(_record(record))
