"""Who may do what through the REST API and the DLRouter-compatible endpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rest_framework.permissions import SAFE_METHODS, BasePermission

if TYPE_CHECKING:
    from rest_framework.request import Request
    from rest_framework.views import APIView


class StaffWriteAuthenticatedRead(BasePermission):
    """Reads need an authenticated user; writes need a staff user."""

    message = "Changing the registry requires a staff account."

    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        if request.method in SAFE_METHODS:
            return True
        return bool(user.is_staff)
