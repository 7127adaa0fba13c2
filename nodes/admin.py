"""The operator's admin. Every save, delete and action goes through ``nodes.services`` so admin edits
are audited, bump the configuration version and (for registry nodes) are protected from the sync;
Django's own admin history is kept as well."""

from __future__ import annotations

import datetime
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html, format_html_join

from . import (
    admin_keys,  # noqa: F401  (registers the API keys' admin)
    admin_usage,  # noqa: F401  (registers the usage rows' admin)
    services,
)
from .admin_base import ServiceAdminMixin, badge
from .admin_base import actor_of as _actor
from .choices import (
    ApprovalMode,
    BreakerState,
    ControlPlaneKind,
    NodeHealth,
    NodeRole,
    NodeSource,
    NodeState,
    ServingMode,
    Strategy,
    SyncState,
)
from .live import health as live_health
from .live.breakers import read_breakers_sync
from .live.connection import client as redis_client
from .models import ChangeRecord, ControlPlane, ModelAlias, Node, RoutePolicy


class ModelAliasInline(admin.TabularInline):
    model = ModelAlias
    fk_name = "node"
    extra = 0
    fields = ("name", "served_name", "origin")


@admin.register(Node)
class NodeAdmin(ServiceAdminMixin[Node], admin.ModelAdmin):
    entity = "node"

    list_display = (
        "url",
        "role_badge",
        "state_badge",
        "health_badge",
        "breaker_badge",
        "source_badge",
        "engine_type",
        "models_list",
        "weight",
        "last_seen_at",
    )
    list_filter = ("role", "state", "health", "engine_type", "source", "control_plane")
    search_fields = ("url", "name", "aliases__name", "aliases__served_name")
    inlines = [ModelAliasInline]
    actions = ["approve_nodes", "drain_nodes", "enable_nodes", "disable_nodes", "probe_nodes"]
    readonly_fields = (
        "live_health",
        *Node.READ_ONLY_FIELDS,
        "operator_fields",
        "health_history",
        "created_at",
        "updated_at",
    )
    fieldsets = (
        (None, {"fields": ("url", "name", "engine_type", "role", "state", "weight", "max_concurrency")}),
        (
            "Health",
            {
                "fields": (
                    "live_health",
                    "health_history",
                    ("health_interval", "health_timeout", "health_failures", "health_successes"),
                ),
                "description": "Probed by the prober (manage.py run_prober); empty settings inherit from the "
                "control plane, then from ROUTERPANEL_HEALTH_*.",
            },
        ),
        ("Engine options", {"fields": ("endpoints", "bootstrap_port", "dp_size", "kv_connector_address", "metadata")}),
        (
            "Registry",
            {
                "fields": ("source", "control_plane", "entity_id", "scope", "kind", "last_seen_at", "operator_fields"),
                "classes": ("collapse",),
            },
        ),
        ("Timestamps", {"fields": ("created_at", "updated_at"), "classes": ("collapse",)}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).prefetch_related("aliases")

    @admin.display(description="role", ordering="role")
    def role_badge(self, node: Node) -> str:
        return badge(NodeRole, node.role)

    @admin.display(description="state", ordering="state")
    def state_badge(self, node: Node) -> str:
        return badge(NodeState, node.state)

    @admin.display(description="health", ordering="health")
    def health_badge(self, node: Node) -> str:
        # The live state when Redis has it (the list's filter and ordering use the database's mirror).
        return badge(NodeHealth, getattr(self, "_health", {}).get(node.pk, node.health))

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        # One Redis read per page for each live column.
        self._breakers = read_breakers_sync(redis_client()) or {}
        self._health = live_health.read_states_sync(redis_client()) or {}
        return super().changelist_view(request, extra_context)

    @admin.display(description="health")
    def live_health(self, node: Node) -> str:
        record = (live_health.read_records_sync(redis_client(), [node.pk]) or {}).get(node.pk) if node.pk else None
        if record is None:
            return format_html("{} (as last recorded; no live state)", badge(NodeHealth, node.health))
        since = datetime.datetime.fromtimestamp(record.since, tz=datetime.UTC) if record.since else None
        checked = datetime.datetime.fromtimestamp(record.at, tz=datetime.UTC)
        return format_html(
            "{} since {}; {} failed and {} good probes in a row; last probe {} ({} ms): {}",
            badge(NodeHealth, record.state),
            since.strftime("%Y-%m-%d %H:%M:%S") if since else "—",
            record.failures,
            record.successes,
            checked.strftime("%H:%M:%S"),
            "—" if record.ms is None else record.ms,
            record.detail,
        )

    @admin.display(description="breaker")
    def breaker_badge(self, node: Node) -> str:
        state = getattr(self, "_breakers", {}).get(node.pk, BreakerState.CLOSED.value)
        return badge(BreakerState, state)  # its label, as the dashboard shows it

    @admin.display(description="source", ordering="source")
    def source_badge(self, node: Node) -> str:
        return badge(NodeSource, node.source)

    @admin.display(description="served models")
    def models_list(self, node: Node) -> str:
        return format_html_join(", ", "{}", ((name,) for name in node.served_models)) or "—"

    def save_formset(self, request: HttpRequest, form: Any, formset: BaseInlineFormSet, change: bool) -> None:
        actor = _actor(request)
        instances = formset.save(commit=False)
        for alias in formset.deleted_objects:
            services.alias_delete(alias=alias, actor=actor)
        for alias in instances:
            services.alias_save(alias=alias, actor=actor)
        formset.save_m2m()

    def _apply(self, request: HttpRequest, queryset: QuerySet[Node], service: services.NodeAction, verb: str) -> None:
        actor = _actor(request)
        count = 0
        for node in queryset:
            service(node=node, actor=actor)
            count += 1
        self.message_user(request, f"{verb} {count} node(s).", messages.SUCCESS)

    @admin.action(description="Approve selected pending nodes (they start taking traffic)")
    def approve_nodes(self, request: HttpRequest, queryset: QuerySet) -> None:
        actor = _actor(request)
        pending = list(queryset.filter(state=NodeState.PENDING))
        for node in pending:
            services.node_approve(node=node, actor=actor)
        skipped = queryset.count() - len(pending)
        note = f"; {skipped} selected node(s) were not pending and were left alone" if skipped else ""
        self.message_user(request, f"Approved {len(pending)} node(s){note}.", messages.SUCCESS)

    @admin.action(description="Drain selected nodes (no new requests; in-flight ones finish)")
    def drain_nodes(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._apply(request, queryset, services.node_drain, "Drained")

    @admin.display(description="recent probes (repeats folded)")
    def health_history(self, node: Node) -> str:
        rows = live_health.recent_history(redis_client(), node.pk) if node.pk else []
        if not rows:
            return "—"
        return format_html(
            "<table><thead><tr><th scope='col'>when</th><th scope='col'>result</th><th scope='col'>ms</th>"
            "</tr></thead><tbody>{}</tbody></table>",
            format_html_join(
                "",
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                (
                    (
                        datetime.datetime.fromtimestamp(r["t"], tz=datetime.UTC).strftime("%H:%M:%S"),
                        r["detail"],
                        r["ms"],
                    )
                    for r in rows
                ),
            ),
        )

    @admin.action(description="Probe selected nodes' /health now")
    def probe_nodes(self, request: HttpRequest, queryset: QuerySet) -> None:
        report = services.health_check_nodes(node_ids=list(queryset.values_list("pk", flat=True)))
        changes = "; ".join(report.transitions) or "no health changes"
        self.message_user(request, f"Probed {report.checked} node(s): {changes}.", messages.SUCCESS)

    @admin.action(description="Enable selected nodes")
    def enable_nodes(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._apply(request, queryset, services.node_enable, "Enabled")

    @admin.action(description="Disable selected nodes")
    def disable_nodes(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._apply(request, queryset, services.node_disable, "Disabled")


@admin.register(ModelAlias)
class ModelAliasAdmin(ServiceAdminMixin[ModelAlias], admin.ModelAdmin):
    entity = "alias"
    list_display = ("name", "served_name", "origin", "node")
    list_filter = ("origin",)
    search_fields = ("name", "served_name", "node__url")
    autocomplete_fields = ("node",)


@admin.register(RoutePolicy)
class RoutePolicyAdmin(ServiceAdminMixin[RoutePolicy], admin.ModelAdmin):
    entity = "policy"
    list_display = ("__str__", "strategy_badge", "mode_badge", "retry_budget", "first_token_timeout", "enabled")
    list_filter = ("strategy", "serving_mode", "enabled")
    search_fields = ("model",)

    @admin.display(description="strategy", ordering="strategy")
    def strategy_badge(self, policy: RoutePolicy) -> str:
        return badge(Strategy, policy.strategy)

    @admin.display(description="serving mode", ordering="serving_mode")
    def mode_badge(self, policy: RoutePolicy) -> str:
        return badge(ServingMode, policy.serving_mode)

    def has_delete_permission(self, request: HttpRequest, obj: RoutePolicy | None = None) -> bool:
        if obj is not None and obj.model == "":
            return False
        return super().has_delete_permission(request, obj)


@admin.register(ControlPlane)
class ControlPlaneAdmin(ServiceAdminMixin[ControlPlane], admin.ModelAdmin):
    entity = "control_plane"
    list_display = (
        "name",
        "kind_badge",
        "address",
        "scope",
        "engine_type",
        "approval_badge",
        "registration_token_prefix",
        "enabled",
        "sync_badge",
        "last_sync_at",
        "last_sync_counts",
        "last_sync_error",
    )
    actions = ["sync_now", "issue_registration_token", "revoke_registration_token"]
    list_filter = ("kind", "approval_mode", "enabled", "engine_type", "sync_state")
    search_fields = ("name", "address", "scope")
    readonly_fields = (*ControlPlane.READ_ONLY_FIELDS, "created_at", "updated_at")

    @admin.display(description="kind", ordering="kind")
    def kind_badge(self, control_plane: ControlPlane) -> str:
        return badge(ControlPlaneKind, control_plane.kind)

    @admin.display(description="approval", ordering="approval_mode")
    def approval_badge(self, control_plane: ControlPlane) -> str:
        return badge(ApprovalMode, control_plane.approval_mode)

    @admin.display(description="sync", ordering="sync_state")
    def sync_badge(self, control_plane: ControlPlane) -> str:
        return badge(SyncState, control_plane.sync_state)

    def save_model(self, request: HttpRequest, obj: ControlPlane, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        token = getattr(obj, "issued_token", None)
        if token is not None:
            self._show_token(request, obj, token)

    def _show_token(self, request: HttpRequest, control_plane: ControlPlane, token: str) -> None:
        url = request.build_absolute_uri(f"/register/{token}")
        messages.warning(
            request,
            format_html(
                "Copy the registration URL of “{}” now — its token is stored hashed and will not be shown "
                "again. Start engines with <code>--proxy-url {}</code>",
                control_plane.name,
                url,
            ),
        )

    @admin.action(description="Sync now")
    def sync_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        for control_plane in queryset:
            result = services.registry_sync(control_plane_id=control_plane.pk)
            level = messages.SUCCESS if result.ok else messages.WARNING if result.skipped else messages.ERROR
            self.message_user(request, f"{control_plane.name}: {result.summary()}", level)

    @admin.action(description="Issue a new registration token (the old one stops working)")
    def issue_registration_token(self, request: HttpRequest, queryset: QuerySet) -> None:
        for control_plane in queryset:
            token = services.control_plane_issue_token(control_plane=control_plane, actor=_actor(request))
            self._show_token(request, control_plane, token)

    @admin.action(description="Revoke the registration token (registered nodes stay)")
    def revoke_registration_token(self, request: HttpRequest, queryset: QuerySet) -> None:
        for control_plane in queryset:
            services.control_plane_revoke_token(control_plane=control_plane, actor=_actor(request))
        self.message_user(request, f"Revoked the registration token of {queryset.count()} control plane(s).")


@admin.register(ChangeRecord)
class ChangeRecordAdmin(admin.ModelAdmin):
    """The audit trail; read-only."""

    list_display = ("created_at", "actor_label", "via", "action", "object_type", "object_repr")
    list_filter = ("via", "action", "object_type")
    search_fields = ("actor_label", "object_repr", "object_id", "note")
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ChangeRecord | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: ChangeRecord | None = None) -> bool:
        return False
