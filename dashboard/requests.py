"""The Requests page: the request explanations the web workers keep (``nodes.live.explain``), newest
first, filtered like ``/api/requests/`` (whose query validation it shares), one request's full record
on click, and a live tail over the WebSocket ``/ws/requests/`` (``dashboard.consumers``).

The first page is read here, so the page shows records without waiting for a script; older pages
are links with the store's cursor; the tail adds the records that arrive after the newest shown.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any, TypedDict

from django.conf import settings
from django.http import QueryDict
from django.urls import reverse
from redis.exceptions import RedisError

from nodes.choices import BadgeChoices, ExclusionReason, NodeRole, ServingMode, Strategy
from nodes.live import explain_store
from nodes.live.connection import client as redis_client
from nodes.live.explain import Record
from nodes.selectors import RequestFilterOptions

logger = logging.getLogger(__name__)

WEBSOCKET_PATH = "/ws/requests/"
PAGE_SIZE = 50
# The quick time ranges the page offers (seconds back from now), besides since/until.
WINDOWS = {
    "5m": (300, "Last 5 minutes"),
    "15m": (900, "Last 15 minutes"),
    "1h": (3600, "Last hour"),
    "6h": (6 * 3600, "Last 6 hours"),
    "24h": (24 * 3600, "Last 24 hours"),
}
STATUSES = {"2xx": "2xx", "4xx": "4xx", "5xx": "5xx", "error": "Any error"}
FILTERS = ("model", "node", "key", "status", "since", "until")


class RequestsPage(TypedDict):
    records: list[Record]
    selected: Record | None
    selected_missing: str | None  # a request id asked for that no record holds
    live: bool  # the store could be read
    tail: bool  # the page shows the newest records, so the live tail adds to it
    newest_entry: str  # where the tail starts
    older: str | None  # the next page's URL
    errors: dict[str, list[str]]
    filters: dict[str, str]  # as the form shows them


def _choices(cls: type[BadgeChoices]) -> dict[str, dict[str, str]]:
    return {value: {"label": str(label), "colour": cls.colour(value)} for value, label in cls.choices}


def _query(params: QueryDict) -> dict[str, str]:
    """The page's form values as the API's query: the quick time range becomes ``since``, and the
    page's local-time inputs (``datetime-local``, no zone) are read in the server's time zone."""
    query = {name: str(params.get(name, "")) for name in (*FILTERS, "cursor") if params.get(name)}
    window = WINDOWS.get(str(params.get("window", "")))
    if window is not None and "since" not in query:
        since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=window[0])
        query["since"] = since.isoformat()
    return query


def requests_page(params: QueryDict) -> RequestsPage:
    """The page's data for its query string (blocking: Redis, with short timeouts)."""
    from nodes.api.requests import RequestQuerySerializer  # not at the top: see dashboard.consumers.RequestsConsumer

    query = RequestQuerySerializer(data={**_query(params), "limit": PAGE_SIZE})
    filters = {name: str(params.get(name, "")) for name in (*FILTERS, "window")}
    page = RequestsPage(
        records=[],
        selected=None,
        selected_missing=None,
        live=True,
        tail=not params.get("cursor") and not params.get("until"),
        newest_entry="0",
        older=None,
        errors={},
        filters=filters,
    )
    if not query.is_valid():
        page["errors"] = {name: [str(e) for e in errors] for name, errors in query.errors.items()}
        page["tail"] = False
        return page
    client = redis_client()
    try:
        found = explain_store.read_page(
            client, query.wanted(), before=query.validated_data.get("cursor"), limit=PAGE_SIZE
        )
        wanted_id = params.get("request")
        if wanted_id:
            page["selected"] = explain_store.find(client, wanted_id[:500])
            page["selected_missing"] = None if page["selected"] is not None else wanted_id[:500]
        newest = explain_store.newest_entry_sync(client)
    except (RedisError, OSError) as exc:
        logger.debug("the Requests page could not read Redis: %s", exc)
        page["live"] = page["tail"] = False
        return page
    page["records"] = found.records
    page["newest_entry"] = newest
    if found.cursor is not None:
        following = params.copy()
        following["cursor"] = found.cursor
        following.pop("request", None)
        page["older"] = f"{reverse('dashboard-requests')}?{following.urlencode()}"
    return page


# What the live tail filters by: it only adds records newer than the page's, so no time range.
TAIL_FILTERS = ("model", "node", "key", "status")


def page_config(page: RequestsPage, options: RequestFilterOptions) -> dict[str, Any]:
    """What the page's script needs: the tail's path and filters, and every label and badge colour
    it shows (``nodes.choices``, their one definition)."""
    tail_filters = {name: page["filters"][name] for name in TAIL_FILTERS if page["filters"].get(name)}
    return {
        "websocket_path": WEBSOCKET_PATH,
        "api_path": reverse("request-list"),
        "page_path": reverse("dashboard-requests"),
        "tail": page["tail"],
        "tail_filters": tail_filters,
        "newest_entry": page["newest_entry"],
        "time_zone": settings.TIME_ZONE,
        "nodes": {option["value"]: option["label"] for option in options["nodes"]},
        "choices": {
            "reason": _choices(ExclusionReason),
            "role": _choices(NodeRole),
            "serving_mode": _choices(ServingMode),
            "strategy": _choices(Strategy),
        },
    }
