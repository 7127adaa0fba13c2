"""schemathesis drives the REST API from its own OpenAPI schema: whatever it sends, the API never
answers 5xx, and every status and body it answers is documented.

Left out on purpose: endpoints that make RouterPanel call out to the URL in the data (DLRouter's
/nodes/* fetch models and terminate nodes, "sync" calls a registry, "probe" a node) — generated
data would aim them at arbitrary hosts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from django.conf import settings as django_settings
from django.core import signals
from django.core.exceptions import ValidationError
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections, models
from django.db.models.signals import post_save
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from schemathesis.config import SchemathesisConfig

from nodes import services
from nodes.models import ApiKey, ConfigVersion, ControlPlane, ModelAlias, Node, RoutePolicy

CALLS_OUT = r"^/nodes/|/sync/$|/probe/$"

# Schemathesis's coverage phase (each field's boundaries and wrong types, about 300 calls per
# operation) runs on PostgreSQL, the production database, where those boundaries meet the column
# types; on SQLite the suite runs the examples and fuzzing phases only.
ON_POSTGRESQL = django_settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
_generated = SchemaGenerator().get_schema(request=None, public=True)
_config = SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": ON_POSTGRESQL}}})
schema = schemathesis.openapi.from_dict(_generated, config=_config).exclude(path_regex=CALLS_OUT)
schema.app = get_wsgi_application()

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]


@pytest.fixture(autouse=True)
def _keep_the_test_connection() -> Iterator[None]:
    """Django closes the database connection at the end of each request; the WSGI client used here
    (unlike Django's test client) does not stop it, which would end the test's transaction on
    PostgreSQL. Do what Django's test client does."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def staff_token(db, system) -> str:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user("schema-staff", password="pw-schema-123", is_staff=True)
    # Something to read, update and delete, so the generated calls reach past the 404s.
    services.node_create(actor=system, url="http://127.0.0.1:9", models=["m"])
    return Token.objects.create(user=user).key


REGISTRY_MODELS = (Node, ModelAlias, RoutePolicy, ApiKey, ControlPlane)


@pytest.fixture
def saved_rows() -> Iterator[list[models.Model]]:
    """Every registry row saved while the test runs (Django's post_save), so that what the
    generated calls stored can be checked without reading every table after every call."""
    saved: list[models.Model] = []

    def remember(sender: type[models.Model], instance: models.Model, **kwargs: object) -> None:
        saved.append(instance)

    for model in REGISTRY_MODELS:
        post_save.connect(remember, sender=model, weak=False)
    yield saved
    for model in REGISTRY_MODELS:
        post_save.disconnect(remember, sender=model)


def stored_rows_that_fail_validation(saved: list[models.Model]) -> list[str]:
    """The rows saved since the last look, as stored now, that their model's own validation
    rejects (what the admin or a service would refuse to save); and the configuration version row
    if it went missing."""
    problems = []
    for instance in saved:
        row = type(instance).objects.filter(pk=instance.pk).first()
        if row is None:  # deleted since
            continue
        try:
            row.full_clean()
        except ValidationError as exc:
            problems.append(f"{type(row).__name__} {row.pk}: {exc.message_dict}")
    saved.clear()
    if not ConfigVersion.objects.filter(pk=1).exists():
        problems.append("the configuration version row is gone")
    return problems


@pytest.mark.django_db
@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_rest_api_never_fails_answers_as_documented_and_stores_nothing_invalid(
    case, staff_token: str, redis_url: str, saved_rows: list[models.Model]
) -> None:
    """Each generated call runs inside this test's transaction, so what it stored is checked here:
    nothing the models' validation would reject, and the fixture's node untouched unless the call
    wrote to a node or an alias (its served models are its aliases). With a Redis to read:
    ``/api/requests/`` answers 503 (documented) only when it cannot."""
    saved_rows.clear()  # the fixtures' own rows
    case.call_and_validate(headers={"Authorization": f"Bearer {staff_token}"}, checks=CHECKS)
    assert stored_rows_that_fail_validation(saved_rows) == []
    writes_a_node = case.method != "GET" and case.path.startswith(("/api/nodes/", "/api/aliases/"))
    if not writes_a_node:
        assert Node.objects.get(url="http://127.0.0.1:9").served_models == ["m"]
