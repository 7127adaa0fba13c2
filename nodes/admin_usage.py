"""The admin of the hourly usage rows: read-only (the roll-up writes them), filterable, and
downloadable as CSV (docs/usage.md)."""

from __future__ import annotations

import csv
import io

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse

from .models import UsageHour

CSV_COLUMNS = (
    "hour",
    "key_id",
    "key_name",
    "model",
    "node",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "requests",
    "errors",
    "mean_ttft_ms",
)


def usage_csv(rows: QuerySet[UsageHour]) -> str:
    """The rows as CSV, one line per row, with a header line."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for row in rows.order_by("hour", "key_id", "model", "node"):
        mean = row.mean_ttft_ms
        writer.writerow(
            [
                row.hour.isoformat(),
                row.key_id,
                row.key_name,
                row.model,
                row.node,
                row.prompt_tokens,
                row.completion_tokens,
                row.total_tokens,
                row.requests,
                row.errors,
                "" if mean is None else round(mean, 1),
            ]
        )
    return out.getvalue()


@admin.register(UsageHour)
class UsageHourAdmin(admin.ModelAdmin):
    list_display = (
        "hour",
        "model",
        "key_name",
        "node",
        "prompt_tokens",
        "completion_tokens",
        "requests",
        "errors",
        "mean_ttft",
    )
    list_filter = ("model", "key_name")
    search_fields = ("model", "key_name", "node")
    date_hierarchy = "hour"
    actions = ["download_csv"]

    @admin.display(description="Mean TTFT (ms)")
    def mean_ttft(self, row: UsageHour) -> str:
        mean = row.mean_ttft_ms
        return "-" if mean is None else f"{mean:.0f}"

    @admin.action(description="Download as CSV")
    def download_csv(self, request: HttpRequest, queryset: QuerySet[UsageHour]) -> HttpResponse:
        response = HttpResponse(usage_csv(queryset), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = 'attachment; filename="routerpanel-usage.csv"'
        return response

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UsageHour | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: UsageHour | None = None) -> bool:
        return bool(request.user.is_superuser)  # old rows may be cleared; nothing else edits them
