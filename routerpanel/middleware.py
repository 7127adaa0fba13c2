"""Django middleware of the project's own: the Content-Security-Policy.

``ContentSecurityPolicyMiddleware`` sets ``ROUTERPANEL_CONTENT_SECURITY_POLICY`` on every response
that has none (the admin, the dashboard, the API docs: scripts from our static files only).
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase
from django.utils.deprecation import MiddlewareMixin


class ContentSecurityPolicyMiddleware(MiddlewareMixin):
    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        policy = settings.ROUTERPANEL_CONTENT_SECURITY_POLICY
        if policy and "Content-Security-Policy" not in response:
            response["Content-Security-Policy"] = policy
        return response
