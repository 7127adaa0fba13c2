"""Token authentication that also accepts ``Authorization: Bearer <token>``, with failures counted.

DLRouter's clients and most automation send Bearer tokens; DRF's own scheme is ``Token``. Both
carry the same DRF token, so scripts written for either keep working.

A wrong token counts as a failed login of the client's address in django-axes, exactly like a wrong
password in the admin's form (DRF's throttles never see it: authentication fails before they run).
Past ``AXES_FAILURE_LIMIT`` failures that address gets 429 for the cool-off period, the right token
included, so guessing tokens is as slow as guessing passwords.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from axes.handlers.proxy import AxesProxyHandler
from django.contrib.auth.signals import user_login_failed
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.request import Request

if TYPE_CHECKING:
    from drf_spectacular.openapi import AutoSchema

CREDENTIALS = {"username": "<REST API token>"}  # what the attempt is recorded as (never the token)


class LockedOut(exceptions.Throttled):
    default_detail = "Too many failed logins or tokens from this address; try again later."


class CountedTokenAuthentication(TokenAuthentication):
    """DRF's ``Token`` scheme, with failures counted (see the module doc)."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        django_request = request._request
        if not self.keyword_used(request):
            return None  # another scheme's header (or none): not our failure to count
        if AxesProxyHandler.is_locked(django_request, CREDENTIALS):
            raise LockedOut
        try:
            return super().authenticate(request)
        except exceptions.AuthenticationFailed:
            user_login_failed.send(sender=type(self), credentials=CREDENTIALS, request=django_request)
            raise

    def keyword_used(self, request: Request) -> bool:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        return header.split(" ", 1)[0].lower() == self.keyword.lower()


class BearerTokenAuthentication(CountedTokenAuthentication):
    keyword = "Bearer"


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """Documents the Bearer form of the DRF token in the OpenAPI schema."""

    target_class = "nodes.api.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "A REST API token: `Bearer <token>`."}
