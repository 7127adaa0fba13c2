"""The REST API's pagination: DRF's limit and offset, with a largest page."""

from __future__ import annotations

from rest_framework.pagination import LimitOffsetPagination


class Pagination(LimitOffsetPagination):
    """``?limit=`` beyond ``max_limit`` gives ``max_limit`` rows (a huge limit once reached the
    database as a number it cannot hold: a 500). An offset past the last row is an empty page."""

    max_limit = 1000
