"""RouterPanel settings.

Every value comes from the environment with a safe default (SQLite, a local Redis, DEBUG on for a
developer's machine; `make run` turns it off, see the Makefile). Project variables are prefixed
``ROUTERPANEL_``. Malformed values stop start-up with a message that names the variable, instead
of surfacing later as a strange error.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from routerpanel.env import env_bool, env_choice, env_float, env_int, env_list, env_redis_url, env_str

BASE_DIR = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Core
# --------------------------------------------------------------------------------------------


def secret_key_from_file(path: str) -> str:
    """The secret key kept in ``path``, generated there (readable by its owner only) on first use:
    `make run` works on a fresh machine without debug mode, and keeps its sessions across runs.
    Several processes may start at once: the first to link its file in place wins, the others read it."""
    if not path:
        return ""
    target = Path(path)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        draft = target.with_name(f".{target.name}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50) + "\n")
        try:
            os.link(draft, target)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    key = target.read_text().strip()
    if len(key) < 50:
        raise ImproperlyConfigured(f"ROUTERPANEL_SECRET_KEY_FILE={path!r} holds fewer than 50 characters.")
    return key


DEBUG = env_bool("ROUTERPANEL_DEBUG", True)

SECRET_KEY = (
    env_str("ROUTERPANEL_SECRET_KEY")
    or env_str("SECRET_KEY")
    or secret_key_from_file(env_str("ROUTERPANEL_SECRET_KEY_FILE"))
)
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("ROUTERPANEL_SECRET_KEY is required when ROUTERPANEL_DEBUG is off.")
    SECRET_KEY = "insecure-development-key-do-not-use-in-production"

ALLOWED_HOSTS = env_list("ROUTERPANEL_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("ROUTERPANEL_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served from here (no CDN)
    "django_celery_beat",
    "axes",
    "channels",
    "nodes",
    "proxy",
    "dashboard",
]

MIDDLEWARE = [
    # First: refuses an oversized body before anything reads it (413), keeps the APIs' errors JSON,
    # and sets the Content-Security-Policy (routerpanel/middleware.py).
    "routerpanel.middleware.ErrorShapesMiddleware",
    "routerpanel.middleware.ContentSecurityPolicyMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: turns a locked-out login into its 429 answer.
    "axes.middleware.AxesMiddleware",
]

# Failed logins (the admin's form) and failed REST API tokens are counted by django-axes, per
# client address, in the database (shared by every process); past the limit that address is
# refused, the right password included, until the cool-off has passed (or an operator runs
# `manage.py axes_reset`). The REST API's token failures feed the same counts
# (nodes/api/authentication.py).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("ROUTERPANEL_LOGIN_FAILURE_LIMIT", 10, minimum=1)
AXES_COOLOFF_TIME = timedelta(seconds=env_float("ROUTERPANEL_LOGIN_COOLOFF", 900.0, minimum=1.0))
AXES_LOCKOUT_PARAMETERS = ["ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_VERBOSE = False

ROOT_URLCONF = "routerpanel.urls"
WSGI_APPLICATION = None
ASGI_APPLICATION = "routerpanel.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # The project's own templates (the admin's branding), ahead of the apps' (admin's included).
        "DIRS": [BASE_DIR / "routerpanel" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --------------------------------------------------------------------------------------------
# Database: SQLite by default, anything dj-database-url understands through DATABASE_URL.
# --------------------------------------------------------------------------------------------

_database_url = env_str("DATABASE_URL") or env_str("ROUTERPANEL_DATABASE_URL")
if _database_url:
    try:
        DATABASES = {"default": dj_database_url.parse(_database_url, conn_max_age=0)}
    except Exception as exc:  # dj-database-url raises several types for a malformed URL
        raise ImproperlyConfigured(f"DATABASE_URL is malformed: {exc}") from None
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_str("ROUTERPANEL_SQLITE_PATH", str(BASE_DIR / "var" / "routerpanel.sqlite3")),
            # Several processes (web, worker, beat) share the file: wait for a lock instead of failing.
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"},
        }
    }
# Under ASGI every request may run on a different thread: persistent connections would leak.
DATABASES["default"]["CONN_MAX_AGE"] = 0

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("ROUTERPANEL_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("ROUTERPANEL_STATIC_ROOT", str(BASE_DIR / "var" / "static")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns on every request when it is missing
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
# In development WhiteNoise serves straight from the apps, so `collectstatic` is optional.
WHITENOISE_USE_FINDERS = DEBUG

# Long prompts must pass; the proxy enforces its own limit with an OpenAI-shaped 413.
ROUTERPANEL_MAX_BODY_BYTES = env_int("ROUTERPANEL_MAX_BODY_BYTES", 32 * 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = ROUTERPANEL_MAX_BODY_BYTES

# --------------------------------------------------------------------------------------------
# Redis, Celery, Channels
# --------------------------------------------------------------------------------------------

ROUTERPANEL_REDIS_URL = env_redis_url("ROUTERPANEL_REDIS_URL", "redis://127.0.0.1:6379/0")
# Channel on which every configuration version bump is published; the proxy listens to it.
ROUTERPANEL_CONFIG_CHANNEL = env_str("ROUTERPANEL_CONFIG_CHANNEL", "routerpanel:config")

CELERY_BROKER_URL = env_redis_url("ROUTERPANEL_CELERY_BROKER_URL", ROUTERPANEL_REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TIMEZONE = TIME_ZONE
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# Active health checks: the prober (`manage.py run_prober`, nodes/prober/) probes each active or
# draining node's GET /health every INTERVAL seconds (with jitter, each node at its own phase) and
# gives up on a probe after TIMEOUT. A healthy node turns unhealthy after FAILURES failed probes in a
# row, an unhealthy one healthy after SUCCESSES; a node never probed turns healthy at its first
# success. With the defaults a dead node leaves its routes 4-5 s after it stops answering. A
# control plane or a node may set its own values (empty fields use these).
ROUTERPANEL_HEALTH_INTERVAL = env_float("ROUTERPANEL_HEALTH_INTERVAL", 2.0, minimum=0.2)
ROUTERPANEL_HEALTH_TIMEOUT = env_float("ROUTERPANEL_HEALTH_TIMEOUT", 1.0, minimum=0.05)
ROUTERPANEL_HEALTH_FAILURES = env_int("ROUTERPANEL_HEALTH_FAILURES", 2, minimum=1)
ROUTERPANEL_HEALTH_SUCCESSES = env_int("ROUTERPANEL_HEALTH_SUCCESSES", 2, minimum=1)
# Probes kept per node in Redis for the admin's "recent probes".
ROUTERPANEL_HEALTH_HISTORY = env_int("ROUTERPANEL_HEALTH_HISTORY", 20, minimum=0)
# Envoy's panic threshold: when fewer than this fraction of a model's probed active nodes of a role
# pass health, route to all of them rather than to the few (or none). 0 turns it off; a route policy
# may set its own. See docs/decisions/0008-health-as-live-state.md.
ROUTERPANEL_HEALTH_PANIC_THRESHOLD = env_float("ROUTERPANEL_HEALTH_PANIC_THRESHOLD", 0.5, minimum=0.0)
if ROUTERPANEL_HEALTH_PANIC_THRESHOLD > 1:
    raise ImproperlyConfigured("ROUTERPANEL_HEALTH_PANIC_THRESHOLD must be between 0 and 1.")
# Probe a node at once when it is registered through the REST API or /nodes/add, so it takes
# traffic as soon as it answers (a node never probed takes none).
ROUTERPANEL_HEALTH_PROBE_ON_REGISTER = env_bool("ROUTERPANEL_HEALTH_PROBE_ON_REGISTER", True)
# The prober: probes in flight at most; a probe sent later than MAX_LAG after its time, or whose
# failure overlaps a stall of the prober's own event loop longer than MAX_LAG, decides nothing;
# results are published every FLUSH_INTERVAL seconds.
ROUTERPANEL_PROBER_CONCURRENCY = env_int("ROUTERPANEL_PROBER_CONCURRENCY", 512, minimum=1)
ROUTERPANEL_PROBER_MAX_LAG = env_float("ROUTERPANEL_PROBER_MAX_LAG", 0.2, minimum=0.01)
ROUTERPANEL_PROBER_FLUSH_INTERVAL = env_float("ROUTERPANEL_PROBER_FLUSH_INTERVAL", 0.5, minimum=0.05)
# Beat's static schedule (django-celery-beat copies it into the database, where the admin shows it).
# `expires` just under the interval: a backlog never piles up runs.
CELERY_BEAT_SCHEDULE = {
    "api-key-usage": {"task": "nodes.record_key_usage", "schedule": 30.0, "options": {"expires": 27.0}},
    # Idempotent: each run rewrites the current and the previous hour's rows (docs/usage.md).
    "usage-rollup": {"task": "nodes.rollup_usage", "schedule": 300.0, "options": {"expires": 270.0}},
    "usage-prune": {"task": "nodes.prune_usage", "schedule": 3600.0, "options": {"expires": 3500.0}},
}
# Run tasks in-process (tests, one-off scripts) when asked; never in production.
CELERY_TASK_ALWAYS_EAGER = env_bool("ROUTERPANEL_CELERY_EAGER", False)

# A WebSocket consumer waits for group messages with a blocking pop Redis ends every 5 s; redis-py
# 8's default read timeout is 5 s too, and a read that lost the race closed a quiet dashboard's
# WebSocket. Twice the pop's: still a bound on a Redis that hangs.
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [{"address": ROUTERPANEL_REDIS_URL, "socket_timeout": 10.0}]},
    }
}

# --------------------------------------------------------------------------------------------
# REST API
# --------------------------------------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "nodes.api.authentication.BearerTokenAuthentication",
        "nodes.api.authentication.CountedTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["nodes.api.permissions.StaffWriteAuthenticatedRead"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PARSER_CLASSES": [
        "nodes.api.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "nodes.api.pagination.Pagination",
    "PAGE_SIZE": 100,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "nodes.api.exceptions.exception_handler",
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
}

SPECTACULAR_SETTINGS = {
    "TITLE": "RouterPanel API",
    "DESCRIPTION": "Manage inference nodes, model aliases, route policies, control planes and proxy API keys; "
    "read why each proxied request went where it went.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI from drf-spectacular-sidecar's static files: works offline, trusts no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "nodes.api.schema.add_error_responses",
    ],
    # The serving mode is a route policy's field and a request explanation's: one enum for both.
    "ENUM_NAME_OVERRIDES": {"ServingModeEnum": "nodes.choices.ServingMode"},
}

# --------------------------------------------------------------------------------------------
# RouterPanel
# --------------------------------------------------------------------------------------------

ENGINE_TYPES = {"nanodeploy", "vllm", "sglang", "lmdeploy", "openai"}
# DLRouter had one backend type per process. A node added without `engine_type` (`/nodes/add`, the
# REST API) gets the type its own endpoints show (`nodes.engine_detect`); this one only when the
# node cannot be reached (the health checker detects it once the node answers).
ROUTERPANEL_DEFAULT_ENGINE_TYPE = env_choice("ROUTERPANEL_DEFAULT_ENGINE_TYPE", "nanodeploy", ENGINE_TYPES)
# How long each request of that detection may take (they run concurrently, off the event loop).
ROUTERPANEL_ENGINE_DETECT_TIMEOUT = env_float("ROUTERPANEL_ENGINE_DETECT_TIMEOUT", 1.0, minimum=0.05)
# How long `/nodes/add` waits for a node's `/v1/models` when the caller gives no models.
ROUTERPANEL_NODE_PROBE_TIMEOUT = env_float("ROUTERPANEL_NODE_PROBE_TIMEOUT", 5.0, minimum=0.1)
# How long `/nodes/terminate` waits for a node's `/terminate`.
ROUTERPANEL_TERMINATE_TIMEOUT = env_float("ROUTERPANEL_TERMINATE_TIMEOUT", 10.0, minimum=0.1)
# How long one NanoCtrl call of the registry sync may take.
ROUTERPANEL_REGISTRY_TIMEOUT = env_float("ROUTERPANEL_REGISTRY_TIMEOUT", 5.0, minimum=0.1)

# --------------------------------------------------------------------------------------------
# Security behind a TLS-terminating proxy (production: ROUTERPANEL_DEBUG=0)
# --------------------------------------------------------------------------------------------

if env_bool("ROUTERPANEL_BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Production (DEBUG off) defaults to HTTPS everywhere: redirect, secure cookies, a year of HSTS.
# The health and metrics endpoints stay reachable over plain HTTP for probes inside the network.
SECURE_SSL_REDIRECT = env_bool("ROUTERPANEL_SECURE_SSL_REDIRECT", not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^health", r"^metrics$"]
SESSION_COOKIE_SECURE = env_bool("ROUTERPANEL_SECURE_COOKIES", not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SESSION_COOKIE_HTTPONLY = True
SECURE_HSTS_SECONDS = env_int("ROUTERPANEL_HSTS_SECONDS", 0 if DEBUG else 31_536_000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("ROUTERPANEL_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
SECURE_HSTS_PRELOAD = env_bool("ROUTERPANEL_HSTS_PRELOAD", not DEBUG)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# Every page Django serves (admin, dashboard, API docs) may run only scripts from our own static
# files: no inline script, no eval, nothing from another origin. Styles may be inline (the admin's
# templates use style attributes); the dashboard's WebSocket is same-origin.
ROUTERPANEL_CONTENT_SECURITY_POLICY = env_str(
    "ROUTERPANEL_CONTENT_SECURITY_POLICY",
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'",
)

# --------------------------------------------------------------------------------------------
# Logging: plain lines on stderr; secrets are never part of a log message.
# --------------------------------------------------------------------------------------------

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("ROUTERPANEL_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# --------------------------------------------------------------------------------------------
# Proxy (the /v1 data path)
# --------------------------------------------------------------------------------------------

# Require `Authorization: Bearer <API key>` on /v1 (turn off only on a trusted network).
ROUTERPANEL_PROXY_REQUIRE_KEY = env_bool("ROUTERPANEL_PROXY_REQUIRE_KEY", True)
# Seconds between polls of the configuration version in Redis (pub/sub wakes the watcher sooner).
ROUTERPANEL_PROXY_VERSION_POLL_INTERVAL = env_float("ROUTERPANEL_PROXY_VERSION_POLL_INTERVAL", 0.25, minimum=0.01)
# Seconds between polls of the version in the database (1 s while Redis is unreachable).
ROUTERPANEL_PROXY_DB_POLL_INTERVAL = env_float("ROUTERPANEL_PROXY_DB_POLL_INTERVAL", 5.0, minimum=0.1)
# Upper bound of pooled upstream connections per web worker (0 = unlimited).
ROUTERPANEL_PROXY_MAX_CONNECTIONS = env_int("ROUTERPANEL_PROXY_MAX_CONNECTIONS", 1000, minimum=0)
# prefix_cache strategy: remembered prompt-prefix blocks per web worker (bounds its memory).
ROUTERPANEL_PROXY_PREFIX_CACHE_ENTRIES = env_int("ROUTERPANEL_PROXY_PREFIX_CACHE_ENTRIES", 50_000, minimum=100)
# Share in-flight counts and per-key limits across web workers and hosts through Redis, synced
# every ROUTERPANEL_PROXY_SHARED_INTERVAL seconds (each worker falls back to its own counts while
# Redis is unreachable).
ROUTERPANEL_PROXY_SHARED_COUNTERS = env_bool("ROUTERPANEL_PROXY_SHARED_COUNTERS", True)
ROUTERPANEL_PROXY_SHARED_INTERVAL = env_float("ROUTERPANEL_PROXY_SHARED_INTERVAL", 0.1, minimum=0.01)
# A streaming request's response headers must come within this many seconds: engines (vLLM, SGLang,
# LMDeploy, NanoDeploy) send them once they accepted the request, before the prefill, so a node
# that sends none is silent (a frozen engine still accepts connections). Counted as the node's
# failure and retried on another node. The first token then has the route policy's first-token
# timeout (a long prompt's prefill). Raise it if your engines fetch large media (video URLs) before
# answering. Non-streaming answers come whole at the end: their bound is the policy's total timeout,
# and a node marked unhealthy (health checks, about 2 s) or whose breaker opens releases them at once.
ROUTERPANEL_PROXY_STREAM_HEADERS_TIMEOUT = env_float("ROUTERPANEL_PROXY_STREAM_HEADERS_TIMEOUT", 10.0, minimum=0.1)
# Passive health: a node's circuit breaker opens after this many consecutive connect errors,
# timeouts or 5xx answers (never 4xx), and lets one trial request through after the cool-down.
ROUTERPANEL_BREAKER_FAILURES = env_int("ROUTERPANEL_BREAKER_FAILURES", 5, minimum=1)
ROUTERPANEL_BREAKER_COOLDOWN = env_float("ROUTERPANEL_BREAKER_COOLDOWN", 5.0, minimum=0.1)
# This deployment's hop marker, sent on every request to a node and refused (508) when it comes back
# (proxy/loops.py). The same in every process that shares the secret key, database and Redis; set it
# explicitly only to give several deployments sharing those one identity.
ROUTERPANEL_DEPLOYMENT_ID = (
    env_str("ROUTERPANEL_DEPLOYMENT_ID")
    or hmac.new(
        SECRET_KEY.encode(),
        "|".join(str(DATABASES["default"].get(part, "")) for part in ("ENGINE", "NAME", "HOST", "PORT")).encode()
        + ROUTERPANEL_REDIS_URL.encode(),
        hashlib.sha256,
    ).hexdigest()[:16]
)
# Live node health reaches each web worker within a tick of its loop; the routes are recomputed
# from it at most this often (a burst of transitions costs one recomputation per interval).
ROUTERPANEL_PROXY_HEALTH_APPLY_INTERVAL = env_float("ROUTERPANEL_PROXY_HEALTH_APPLY_INTERVAL", 1.0, minimum=0.0)
# Request explanations (docs/architecture.md, "Request explanations"): each proxied request's
# decision record, kept in one Redis stream of at most ROUTERPANEL_EXPLAIN_MAX_RECORDS entries,
# none older than ROUTERPANEL_EXPLAIN_RETENTION seconds; shown on /dashboard/requests/ and at
# /api/requests/ (about 500 bytes of Redis memory each: the default keeps ~25 MB). Off, a client may
# still ask for a request's summary (x-routerpanel-explain: 1).
ROUTERPANEL_EXPLAIN = env_bool("ROUTERPANEL_EXPLAIN", True)
ROUTERPANEL_EXPLAIN_RETENTION = env_float("ROUTERPANEL_EXPLAIN_RETENTION", 3600.0, minimum=1.0)
ROUTERPANEL_EXPLAIN_MAX_RECORDS = env_int("ROUTERPANEL_EXPLAIN_MAX_RECORDS", 50_000, minimum=100)
# Hourly usage rows (UsageHour) are deleted this many days after their hour (beat, hourly; docs/usage.md).
ROUTERPANEL_USAGE_RETENTION_DAYS = env_int("ROUTERPANEL_USAGE_RETENTION_DAYS", 400, minimum=1)
