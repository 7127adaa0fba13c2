"""Choice sets for the registry models and the live state. Each carries its badge colour, the one
definition the admin and the dashboard both show it in."""

from __future__ import annotations

from django.db import models


class BadgeChoices(models.TextChoices):
    """TextChoices whose members map to a badge colour (a CSS colour name or hex value)."""

    @classmethod
    def colour(cls, value: str) -> str:
        return cls._colours().get(value, "#6c757d")

    @classmethod
    def _colours(cls) -> dict[str, str]:  # pragma: no cover - overridden
        return {}


class EngineType(BadgeChoices):
    NANODEPLOY = "nanodeploy", "NanoDeploy"
    VLLM = "vllm", "vLLM"
    SGLANG = "sglang", "SGLang"
    LMDEPLOY = "lmdeploy", "LMDeploy"
    OPENAI = "openai", "OpenAI-compatible"

    @classmethod
    def _colours(cls) -> dict[str, str]:
        return {
            cls.NANODEPLOY: "#5b3cc4",
            cls.VLLM: "#1f6feb",
            cls.SGLANG: "#0f7b6c",
            cls.LMDEPLOY: "#9a5b00",
            cls.OPENAI: "#444d56",
        }


class Endpoint(models.TextChoices):
    """What a node serves of the OpenAI-compatible surface (``Node.endpoints``; defaults per engine
    type in ``nodes.rules.DEFAULT_ENDPOINTS``; the paths in ``proxy.surface``)."""

    CHAT = "chat", "Chat completions"
    COMPLETIONS = "completions", "Completions"
    RESPONSES = "responses", "Responses"
    EMBEDDINGS = "embeddings", "Embeddings"
    RERANK = "rerank", "Rerank"
    SCORE = "score", "Score"
    TOKENIZE = "tokenize", "Tokenize"
    DETOKENIZE = "detokenize", "Detokenize"


class NodeRole(BadgeChoices):
    HYBRID = "hybrid", "Hybrid"
    PREFILL = "prefill", "Prefill"
    DECODE = "decode", "Decode"

    @classmethod
    def _colours(cls) -> dict[str, str]:
        return {cls.HYBRID: "#444d56", cls.PREFILL: "#8250df", cls.DECODE: "#0969da"}

    @classmethod
    def from_dlrouter(cls, value: object) -> NodeRole:
        """Parse a role as DLRouter sends it: 1/2/3 (its enum values) or the role's name."""
        numeric = {1: cls.HYBRID, 2: cls.PREFILL, 3: cls.DECODE}
        if isinstance(value, bool):
            raise ValueError(f"unknown role {value!r}")
        if isinstance(value, int):
            if value in numeric:
                return numeric[value]
            raise ValueError(f"unknown role {value!r}; use 1 (hybrid), 2 (prefill), 3 (decode) or a role name")
        if isinstance(value, str):
            text = value.strip().lower()
            if text.isdigit() and int(text) in numeric:
                return numeric[int(text)]
            # DLRouter's enum names: "EngineRole.PREFILL" or "PREFILL".
            text = text.removeprefix("enginerole.")
            if text in cls.values:
                return cls(text)
        raise ValueError(f"unknown role {value!r}; use 1 (hybrid), 2 (prefill), 3 (decode) or a role name")

    def dlrouter_value(self) -> int:
        return {NodeRole.HYBRID: 1, NodeRole.PREFILL: 2, NodeRole.DECODE: 3}[self]


class NodeState(BadgeChoices):
    """Only ``active`` takes new requests (``nodes.rules.is_routable``). ``pending`` is a node that
    joined a control plane whose approval mode is manual and waits for an operator's approval."""

    ACTIVE = "active", "Active"
    PENDING = "pending", "Pending approval"
    DRAINING = "draining", "Draining"
    DISABLED = "disabled", "Disabled"
    GONE = "gone", "Gone"

    @classmethod
    def _colours(cls) -> dict[str, str]:
        return {
            cls.ACTIVE: "#1a7f37",
            cls.PENDING: "#9a6700",
            cls.DRAINING: "#7d4e00",
            cls.DISABLED: "#6e7781",
            cls.GONE: "#cf222e",
        }


class NodeHealth(BadgeChoices):
    UNKNOWN = "unknown", "Unknown"
    HEALTHY = "healthy", "Healthy"
    UNHEALTHY = "unhealthy", "Unhealthy"

    @classmethod
    def _colours(cls) -> dict[str, str]:
        return {cls.UNKNOWN: "#6e7781", cls.HEALTHY: "#1a7f37", cls.UNHEALTHY: "#cf222e"}


class NodeSource(BadgeChoices):
    """Where a node came from: an operator (admin, REST API, ``/nodes/add``), a NanoCtrl registry
    (the sync), the static configuration, or the engine itself through a control plane's
    registration URL (``/register/<token>/nodes/add``)."""

    MANUAL = "manual", "Manual"
    REGISTRY = "registry", "Registry"
    STATIC = "static", "Static"
    ENGINE = "engine", "Engine registration"

    @classmethod
    def _colours(cls) -> dict[str, str]:
        return {cls.MANUAL: "#0969da", cls.REGISTRY: "#8250df", cls.STATIC: "#444d56", cls.ENGINE: "#0f7b6c"}


class ControlPlaneKind(BadgeChoices):
    """How engines reach a control plane: listed by a NanoCtrl registry (synced), or registering
    themselves directly with RouterPanel through the control plane's registration URL."""

    NANOCTRL = "nanoctrl", "NanoCtrl registry"
    DIRECT = "direct", "Direct registration"

    @classmethod
    def _colours(cls) -> dict[str, str]:
        return {cls.NANOCTRL: "#8250df", cls.DIRECT: "#0f7b6c"}


class ApprovalMode(BadgeChoices):
    """Whether a control plane's new nodes take traffic at once (``auto``) or wait as ``pending``
    until an operator approves them (``manual``)."""

    AUTO = "auto", "Automatic"
    MANUAL = "manual", "Operator approves"

    @classmethod
    def _colours(cls) -> dict[str, str]:
        return {cls.AUTO: "#444d56", cls.MANUAL: "#9a6700"}


class AliasOrigin(BadgeChoices):
    SERVED = "served", "Served name"
    PATH = "path", "Model path"
    BASENAME = "basename", "Path basename"
    OPERATOR = "operator", "Operator"

    @classmethod
    def _colours(cls) -> dict[str, str]:
        return {cls.SERVED: "#1a7f37", cls.PATH: "#6e7781", cls.BASENAME: "#6e7781", cls.OPERATOR: "#0969da"}


class Strategy(BadgeChoices):
    ROUND_ROBIN = "round_robin", "Round robin"
    WEIGHTED_RANDOM = "weighted_random", "Weighted random"
    LEAST_REQUESTS = "least_requests", "Least requests"
    POWER_OF_TWO = "power_of_two", "Power of two choices"
    MIN_OBSERVED_LATENCY = "min_observed_latency", "Min observed latency"
    CONSISTENT_HASH = "consistent_hash", "Consistent hash"
    PREFIX_CACHE = "prefix_cache", "Prefix cache"

    @classmethod
    def _colours(cls) -> dict[str, str]:
        return {value: "#444d56" for value in cls.values}


class ServingMode(BadgeChoices):
    HYBRID = "hybrid", "Hybrid"
    PD = "pd", "Prefill/decode"
    AUTO = "auto", "Auto"

    @classmethod
    def _colours(cls) -> dict[str, str]:
        return {cls.HYBRID: "#444d56", cls.PD: "#8250df", cls.AUTO: "#0969da"}


class SyncState(BadgeChoices):
    IDLE = "idle", "Idle"
    SYNCING = "syncing", "Syncing"
    OK = "ok", "OK"
    FAILED = "failed", "Failed"

    @classmethod
    def _colours(cls) -> dict[str, str]:
        return {cls.IDLE: "#6e7781", cls.SYNCING: "#0969da", cls.OK: "#1a7f37", cls.FAILED: "#cf222e"}


class BreakerState(BadgeChoices):
    """The proxy's circuit breaker for a node (``proxy.breaker``), shared by the web workers through
    Redis (``nodes.live.breakers``). Not stored in the database."""

    CLOSED = "closed", "Closed"
    OPEN = "open", "Open"
    HALF_OPEN = "half_open", "Half-open"

    @classmethod
    def _colours(cls) -> dict[str, str]:
        return {cls.CLOSED: "#1a7f37", cls.OPEN: "#cf222e", cls.HALF_OPEN: "#7d4e00"}


class ChangeVia(models.TextChoices):
    ADMIN = "admin", "Admin"
    API = "api", "REST API"
    COMPAT = "compat", "DLRouter API"
    SYNC = "sync", "Registry sync"
    REGISTER = "register", "Registration URL"
    SYSTEM = "system", "System"


class ChangeAction(models.TextChoices):
    CREATE = "create", "Create"
    UPDATE = "update", "Update"
    DELETE = "delete", "Delete"


class ExclusionReason(BadgeChoices):
    """Why a node of a request's route did not get it, as a request's explanation records it
    (``nodes.live.explain``). The first five are the node's state or health in the routing snapshot
    (out of rotation for every request); the next four are checked per request by the proxy's router
    (``proxy.router.Router.exclusion_reason``); ``not_allowed`` is the API key's refusal of the model;
    ``other`` a per-request check the explanation does not name yet."""

    DRAINING = "draining", "Draining"
    DISABLED = "disabled", "Disabled"
    PENDING = "pending", "Pending approval"
    GONE = "gone", "Gone"
    UNHEALTHY = "unhealthy", "Unhealthy"
    BREAKER_OPEN = "breaker_open", "Breaker open"
    BREAKER_TRIAL = "breaker_trial", "Breaker half-open, trial in flight"
    MAX_CONCURRENCY = "max_concurrency", "At max concurrency"
    TRIED = "tried", "Already tried"
    NOT_ALLOWED = "not_allowed", "Not allowed for the key"
    OTHER = "other", "Unavailable"

    @classmethod
    def _colours(cls) -> dict[str, str]:
        return {
            cls.DRAINING: "#7d4e00",
            cls.DISABLED: "#6e7781",
            cls.PENDING: "#9a6700",
            cls.GONE: "#cf222e",
            cls.UNHEALTHY: "#cf222e",
            cls.BREAKER_OPEN: "#cf222e",
            cls.BREAKER_TRIAL: "#7d4e00",
            cls.MAX_CONCURRENCY: "#9a6700",
            cls.TRIED: "#444d56",
            cls.NOT_ALLOWED: "#8250df",
            cls.OTHER: "#6e7781",
        }


ENDPOINTS_HELP = (
    f"What the node serves, of: {', '.join(Endpoint.values)}. Empty: its engine type's default "
    "(a generation model's endpoints; list embeddings, score, rerank for a pooling model)."
)
