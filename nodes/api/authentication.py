"""Token authentication that also accepts ``Authorization: Bearer <token>``.

DLRouter's clients and most automation send Bearer tokens; DRF's own scheme is ``Token``. Both
carry the same DRF token, so scripts written for either keep working.
"""

from __future__ import annotations

from rest_framework.authentication import TokenAuthentication


class BearerTokenAuthentication(TokenAuthentication):
    keyword = "Bearer"
