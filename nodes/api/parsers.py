"""The REST API's JSON parser: DRF's, reading bodies with ``nodes.validators.load_json`` so that what
JSON allows but nothing can store or render (a lone surrogate, ``NaN``, a body nested deeper than
the interpreter's stack) is a 400 naming the problem, never a 500."""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError

from nodes.validators import load_json


class JSONParser(parsers.JSONParser):
    def parse(
        self, stream: IO[Any], media_type: str | None = None, parser_context: Mapping[str, Any] | None = None
    ) -> Any:
        raw = stream.read() if stream is not None else b""
        try:
            return load_json(raw)
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
