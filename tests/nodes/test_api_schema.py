"""schemathesis drives the REST API from its own OpenAPI schema: whatever it sends, the API never
answers 5xx, and every status and body it answers is documented.

Left out on purpose: endpoints that make RouterPanel call out to the URL in the data (DLRouter's
/nodes/* fetch models and terminate nodes, "sync" calls a registry, "probe" a node) — generated
data would aim them at arbitrary hosts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token

from nodes import services
from nodes.models import Node

CALLS_OUT = r"^/nodes/|/sync/$|/probe/$"

_generated = SchemaGenerator().get_schema(request=None, public=True)
schema = schemathesis.openapi.from_dict(_generated).exclude(path_regex=CALLS_OUT)
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


@pytest.mark.django_db
@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_rest_api_never_fails_and_answers_as_documented(case, staff_token: str, redis_url: str) -> None:
    """With a Redis to read: ``/api/requests/`` answers 503 (documented) only when it cannot."""
    case.call_and_validate(headers={"Authorization": f"Bearer {staff_token}"}, checks=CHECKS)


@pytest.mark.django_db
def test_nothing_stored_is_corrupted_by_the_generated_calls(staff_token: str) -> None:
    """The fixture's node is intact when nobody touches it (a sanity anchor for the run above)."""
    assert Node.objects.get(url="http://127.0.0.1:9").served_models == ["m"]
