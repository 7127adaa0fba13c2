"""The registry's persistent state: control planes, nodes, model aliases and route policies here;
API keys in ``api_keys``, the audit trail and the configuration version in ``audit`` (all of them
importable from ``nodes.models``).

Writes go through ``nodes.services`` so that every routing change is audited and bumps the
configuration version the proxy watches. Models only validate and describe.
"""

from __future__ import annotations

import posixpath

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from ..choices import (
    ENDPOINTS_HELP,
    AliasOrigin,
    ApprovalMode,
    ControlPlaneKind,
    EngineType,
    NodeHealth,
    NodeRole,
    NodeSource,
    NodeState,
    ServingMode,
    Strategy,
    SyncState,
)
from ..networks import clean_networks, normalize_node_url, validate_node_url
from ..validators import refused_character, validate_endpoints, validate_model_name, validate_single_line
from .api_keys import API_KEY_PREFIX, ApiKey, generate_api_key, hash_api_key
from .audit import ChangeRecord, ConfigVersion
from .base import HealthCheckSettings, RegistryModel
from .usage import UsageHour

__all__ = [
    "API_KEY_PREFIX",
    "ApiKey",
    "ChangeRecord",
    "ConfigVersion",
    "ControlPlane",
    "HealthCheckSettings",
    "ModelAlias",
    "Node",
    "RegistryModel",
    "RoutePolicy",
    "UsageHour",
    "aliases_for_model",
    "default_registry_kinds",
    "generate_api_key",
    "hash_api_key",
    "normalize_node_url",
]


def default_registry_kinds() -> list[str]:
    """NanoDeploy's older ``nanodeploy serve`` and the newer ``dlengine serve`` register these kinds."""
    return ["nanodeploy", "dlengine"]


class ControlPlane(HealthCheckSettings):
    """Where engines join from, and who may: a NanoCtrl (dlslime-ctrl) registry whose engines are
    mirrored into the node table, or a set of engines that register themselves directly through
    the control plane's registration URL. Either way its approval mode and allow-list decide
    whether a new node takes traffic (see ``nodes.admission``)."""

    name = models.CharField(max_length=100, unique=True, validators=[validate_single_line])
    kind = models.CharField(
        max_length=10,
        choices=ControlPlaneKind.choices,
        default=ControlPlaneKind.NANOCTRL,
        help_text="NanoCtrl: nodes are synced from a NanoCtrl registry. Direct: engines register themselves "
        "through the registration URL (/register/<token>), e.g. LMDeploy's api_server --proxy-url.",
    )
    address = models.CharField(
        max_length=255,
        blank=True,
        validators=[validate_single_line],
        help_text="NanoCtrl only: host:port of the NanoCtrl server, or its http(s):// URL.",
    )
    scope = models.CharField(
        max_length=100,
        blank=True,
        validators=[validate_single_line],
        help_text="Registry scope; empty for the unscoped registry.",
    )
    kinds = models.JSONField(
        default=default_registry_kinds, blank=True, help_text='Entity kinds to import, e.g. ["nanodeploy", "dlengine"].'
    )
    engine_type = models.CharField(
        max_length=20,
        choices=EngineType.choices,
        default=EngineType.NANODEPLOY,
        help_text="NanoCtrl: the engine type of the nodes it lists. Direct: the type of a registered engine "
        "whose type cannot be detected from its own endpoints.",
    )
    sync_interval = models.PositiveIntegerField(
        default=10,
        validators=[MinValueValidator(1), MaxValueValidator(86400)],
        help_text="Seconds between full listings.",
    )
    redis_url = models.CharField(
        max_length=255,
        blank=True,
        help_text="The registry's Redis (for its change events); empty disables the fast path.",
    )
    enabled = models.BooleanField(default=True)

    approval_mode = models.CharField(
        max_length=10,
        choices=ApprovalMode.choices,
        default=ApprovalMode.AUTO,
        help_text="Automatic: new nodes take traffic at once. Operator approves: they wait as pending "
        "(never routed to) until an operator approves them in the admin or the API.",
    )
    allowed_networks = models.JSONField(
        default=list,
        blank=True,
        help_text='Networks new nodes must be in, e.g. ["10.0.0.0/8", "fd00::/8"]; empty allows any address. '
        "A node outside is refused and not stored.",
    )
    # The registration token is stored hashed, like API keys: shown once when issued.
    registration_token_prefix = models.CharField(
        max_length=16, blank=True, editable=False, help_text="First characters of the registration token."
    )
    registration_token_hash = models.CharField(max_length=64, blank=True, editable=False)
    # Not a field: the plaintext of a token just issued, for the caller to show once.
    issued_token: str | None = None

    sync_state = models.CharField(max_length=10, choices=SyncState.choices, default=SyncState.IDLE, editable=False)
    last_sync_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_sync_duration_ms = models.PositiveIntegerField(null=True, blank=True, editable=False)
    last_sync_counts = models.JSONField(default=dict, blank=True, editable=False)
    last_sync_error = models.TextField(blank=True, editable=False)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    # Set by RouterPanel, never by an operator: read-only in the admin and the REST API.
    SYNC_FIELDS = ("sync_state", "last_sync_at", "last_sync_duration_ms", "last_sync_counts", "last_sync_error")
    READ_ONLY_FIELDS = ("registration_token_prefix", *SYNC_FIELDS)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_direct(self) -> bool:
        return self.kind == ControlPlaneKind.DIRECT

    def clean(self) -> None:
        super().clean()
        if not isinstance(self.kinds, list) or not all(
            isinstance(k, str) and k.strip() and refused_character(k) is None for k in self.kinds
        ):
            raise ValidationError({"kinds": 'Give a list of entity kinds, e.g. ["nanodeploy", "dlengine"].'})
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValidationError({"redis_url": "Use a redis://, rediss:// or unix:// URL."})
        if self.is_direct:
            if self.address.strip():
                raise ValidationError({"address": "A direct-registration control plane has no NanoCtrl address."})
            if self.redis_url.strip():
                raise ValidationError({"redis_url": "A direct-registration control plane has no registry Redis."})
        elif not self.address.strip():
            raise ValidationError({"address": "Give host:port of the NanoCtrl server."})
        try:
            self.allowed_networks = clean_networks(self.allowed_networks)
        except ValidationError as exc:
            raise ValidationError({"allowed_networks": exc.messages}) from None


class Node(HealthCheckSettings):
    """An inference engine endpoint that the proxy may route to."""

    url = models.CharField(
        max_length=500,
        unique=True,
        help_text="Base URL, e.g. http://10.0.0.5:8000, stored in one spelling (localhost, 127.1 and "
        "[::ffff:127.0.0.1] are 127.0.0.1; no default port, no trailing slash).",
    )
    name = models.CharField(
        max_length=200, blank=True, validators=[validate_single_line], help_text="Optional display name."
    )
    engine_type = models.CharField(max_length=20, choices=EngineType.choices, default=EngineType.NANODEPLOY)
    role = models.CharField(max_length=10, choices=NodeRole.choices, default=NodeRole.HYBRID)
    state = models.CharField(max_length=10, choices=NodeState.choices, default=NodeState.ACTIVE)
    # The live health is in Redis (``nodes.live.health``); this column mirrors its transitions (not
    # audited, no configuration bump) and seeds routing when Redis has no entry for the node.
    health = models.CharField(max_length=10, choices=NodeHealth.choices, default=NodeHealth.UNKNOWN)
    consecutive_failures = models.PositiveIntegerField(default=0)
    consecutive_successes = models.PositiveIntegerField(default=0)
    last_checked_at = models.DateTimeField(null=True, blank=True)

    source = models.CharField(max_length=10, choices=NodeSource.choices, default=NodeSource.MANUAL)
    control_plane = models.ForeignKey(
        ControlPlane, null=True, blank=True, on_delete=models.SET_NULL, related_name="nodes"
    )
    entity_id = models.CharField(max_length=255, blank=True, help_text="The registry's entity id (sync identity).")
    scope = models.CharField(max_length=100, blank=True)
    kind = models.CharField(max_length=50, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True, help_text="Last time the registry listed this node.")
    # Fields an operator changed by hand on a registry node; the sync never overwrites them.
    operator_fields = models.JSONField(default=list, blank=True)

    weight = models.PositiveIntegerField(default=1, validators=[MaxValueValidator(10000)])
    max_concurrency = models.PositiveIntegerField(
        default=0,
        validators=[MaxValueValidator(1_000_000)],
        help_text="Concurrent requests allowed; 0 = no limit (as on API keys).",
    )
    bootstrap_port = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(65535)], help_text="SGLang only."
    )
    dp_size = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(1024)], help_text="vLLM data-parallel ranks."
    )
    kv_connector_address = models.CharField(
        max_length=255, blank=True, validators=[validate_single_line], help_text="vLLM KV connector host:port."
    )
    metadata = models.JSONField(default=dict, blank=True)
    endpoints = models.JSONField(default=list, blank=True, validators=[validate_endpoints], help_text=ENDPOINTS_HELP)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    # Written by the health checker and the registry sync, never by an operator: read-only in the
    # admin and the REST API.
    HEALTH_FIELDS = ("health", "consecutive_failures", "last_checked_at")
    REGISTRY_FIELDS = ("source", "control_plane", "entity_id", "scope", "kind", "last_seen_at")
    READ_ONLY_FIELDS = (*HEALTH_FIELDS, *REGISTRY_FIELDS)

    class Meta:
        ordering = ["url"]
        constraints = [
            models.UniqueConstraint(
                fields=["control_plane", "entity_id"],
                condition=~Q(entity_id=""),
                name="node_unique_registry_entity",
            ),
        ]

    def __str__(self) -> str:
        return self.name or self.url

    def clean(self) -> None:
        super().clean()
        written = self.url
        try:
            self.url = validate_node_url(self.url)
        except ValidationError as exc:
            raise ValidationError({"url": exc.messages}) from None
        clash = Node.objects.filter(url=self.url).exclude(pk=self.pk).only("pk", "name", "url").first()
        if clash is not None:
            spelled = f" ({written.strip()} is written {self.url})" if written.strip() != self.url else ""
            named = f" “{clash.name}”" if clash.name else ""
            raise ValidationError(
                {
                    "url": ValidationError(
                        f"A node with URL {self.url} already exists: node {clash.pk}{named}{spelled}.", code="unique"
                    )
                }
            )
        if not isinstance(self.metadata, dict):
            raise ValidationError({"metadata": "Metadata must be a JSON object."})

    @property
    def served_models(self) -> list[str]:
        """The model names this node serves (what the proxy writes into ``model``)."""
        return sorted({alias.served_name for alias in self.aliases.all()})


class ModelAlias(RegistryModel):
    """A name a client may send in ``model``, mapped to the model name a node serves.

    A row with a node belongs to that node (its served name, model path and basename). A row
    without a node is an operator's global alias: it applies to every node serving ``served_name``.
    """

    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.CASCADE, related_name="aliases")
    name = models.CharField(
        max_length=255, validators=[validate_model_name], help_text="What a client sends in the request's model field."
    )
    served_name = models.CharField(
        max_length=255, validators=[validate_model_name], help_text="The model name the node serves (sent upstream)."
    )
    origin = models.CharField(max_length=10, choices=AliasOrigin.choices, default=AliasOrigin.OPERATOR)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "model alias"
        verbose_name_plural = "model aliases"
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["node", "name"],
                name="alias_unique_per_node",
                violation_error_message="This node already has an alias with this name.",
            ),
            models.UniqueConstraint(
                fields=["name"],
                condition=Q(node__isnull=True),
                name="alias_unique_global",
                violation_error_message="A model alias with this name (for no particular node) already exists.",
            ),
        ]

    def __str__(self) -> str:
        return self.name if self.name == self.served_name else f"{self.name} → {self.served_name}"

    def clean(self) -> None:
        super().clean()
        self.name = (self.name or "").strip()
        self.served_name = (self.served_name or "").strip()
        if not self.name:
            raise ValidationError({"name": "An alias needs a name."})
        if not self.served_name:
            raise ValidationError({"served_name": "Name the model the node serves."})


def aliases_for_model(served_name: str, model_path: str = "") -> list[tuple[str, str]]:
    """The (alias, origin) pairs an engine accepts: served name, model path without trailing
    slash, and that path's basename."""
    pairs: list[tuple[str, str]] = [(served_name, AliasOrigin.SERVED)]
    path = (model_path or "").rstrip("/")
    if path and path != served_name:
        pairs.append((path, AliasOrigin.PATH))
        base = posixpath.basename(path)
        if base and base not in {served_name, path}:
            pairs.append((base, AliasOrigin.BASENAME))
    return pairs


class RoutePolicy(RegistryModel):
    """How requests for one model are routed; the row with an empty model is the global default."""

    model = models.CharField(
        max_length=255,
        unique=True,
        blank=True,
        validators=[validate_model_name],
        help_text="Served model name; empty for the global default.",
    )
    strategy = models.CharField(max_length=30, choices=Strategy.choices, default=Strategy.ROUND_ROBIN)
    serving_mode = models.CharField(max_length=10, choices=ServingMode.choices, default=ServingMode.AUTO)
    retry_budget = models.PositiveIntegerField(
        default=2,
        validators=[MaxValueValidator(10)],
        help_text="Extra attempts on other nodes before any byte is sent.",
    )
    connect_timeout = models.FloatField(default=2.0, validators=[MinValueValidator(0.05), MaxValueValidator(600)])
    first_token_timeout = models.FloatField(
        default=120.0, validators=[MinValueValidator(0.1), MaxValueValidator(86400)]
    )
    total_timeout = models.FloatField(default=1800.0, validators=[MinValueValidator(0.1), MaxValueValidator(86400)])
    prefix_min_match = models.PositiveIntegerField(
        default=32, validators=[MinValueValidator(1)], help_text="prefix_cache: characters a prefix must share."
    )
    prefix_load_factor = models.FloatField(
        default=2.0,
        validators=[MinValueValidator(1.0)],
        help_text="prefix_cache: abandon affinity when the preferred node has this many times the least load.",
    )
    panic_threshold = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Route to all of a role's probed nodes when fewer than this fraction pass health (0 = never); "
        "empty = ROUTERPANEL_HEALTH_PANIC_THRESHOLD.",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "route policy"
        verbose_name_plural = "route policies"
        ordering = ["model"]

    def __str__(self) -> str:
        return self.model or "(global default)"

    def clean(self) -> None:
        super().clean()
        self.model = (self.model or "").strip()
        if self.first_token_timeout > self.total_timeout:
            raise ValidationError({"first_token_timeout": "The first-token timeout cannot exceed the total timeout."})
