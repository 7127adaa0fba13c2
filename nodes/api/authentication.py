"""Token authentication that also accepts ``Authorization: Bearer <token>``.

DLRouter's clients and most automation send Bearer tokens; DRF's own scheme is ``Token``. Both
carry the same DRF token, so scripts written for either keep working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import TokenAuthentication

if TYPE_CHECKING:
    from drf_spectacular.openapi import AutoSchema


class BearerTokenAuthentication(TokenAuthentication):
    keyword = "Bearer"


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """Documents the Bearer form of the DRF token in the OpenAPI schema."""

    target_class = "nodes.api.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "A REST API token: `Bearer <token>`."}
