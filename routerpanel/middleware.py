"""Django middleware of the project's own: error answers in the shape each interface promises, and
the Content-Security-Policy.

- ``ErrorShapesMiddleware``: a body larger than ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (by its
  Content-Length) is refused with a 413 before anything reads it (Django would read up to the limit
  and answer 400, or, in debug mode, a page listing the settings). Under ``/api/``, ``/nodes/`` and
  ``/register/`` every error is JSON, whatever produced it (a URL nothing matched, a view that
  allows other methods, a crash, debug mode), because their clients parse it: ``{"detail": ...}``
  as DRF answers under ``/api/``, ``{"error": ...}`` as DLRouter's endpoints answer. Other pages
  keep Django's HTML error pages.
- ``ContentSecurityPolicyMiddleware``: ``ROUTERPANEL_CONTENT_SECURITY_POLICY`` on every response
  that has none (the admin, the dashboard, the API docs: scripts from our static files only).
"""

from __future__ import annotations

from http import HTTPStatus

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.utils.deprecation import MiddlewareMixin

API_PREFIX = "/api/"
COMPAT_PREFIXES = ("/nodes/", "/register/")


def _json_error(request: HttpRequest, status: int, message: str) -> JsonResponse:
    key = "detail" if request.path.startswith(API_PREFIX) else "error"
    return JsonResponse({key: message}, status=status)


def _wants_json(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIX) or request.path.startswith(COMPAT_PREFIXES)


class ErrorShapesMiddleware(MiddlewareMixin):
    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raw = request.META.get("CONTENT_LENGTH") or ""
        if limit is None or not raw.isdigit() or int(raw) <= limit:
            return None
        message = f"The request body exceeds the limit of {limit} bytes."
        if _wants_json(request):
            return _json_error(request, 413, message)
        return HttpResponse(
            f"<!doctype html><title>Request too large</title><h1>Request too large</h1><p>{message}</p>",
            status=413,
        )

    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if response.status_code < 400 or not _wants_json(request):
            return response
        if response.get("Content-Type", "").startswith("application/json"):
            return response
        status = response.status_code
        try:
            message = HTTPStatus(status).phrase + "."
        except ValueError:
            message = f"Error {status}."
        if status >= 500:
            message = "Internal error; the operator's log has the details."
        replacement = _json_error(request, status, message)
        for header in ("Allow", "Retry-After", "WWW-Authenticate"):
            if header in response:
                replacement[header] = response[header]
        return replacement


class ContentSecurityPolicyMiddleware(MiddlewareMixin):
    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        policy = settings.ROUTERPANEL_CONTENT_SECURITY_POLICY
        if policy and "Content-Security-Policy" not in response:
            response["Content-Security-Policy"] = policy
        return response
