"""OpenAI-shaped errors: ``{"error": {"message", "type", "code"}}`` with the right HTTP status.

Every failure the proxy itself produces goes through ``ProxyError`` so clients (including the
official ``openai`` library, which maps statuses to exception classes) see one consistent shape.
Errors that an engine returns are passed through untouched instead.
"""

from __future__ import annotations

import json
from typing import TypedDict


class ErrorBody(TypedDict):
    message: str
    type: str
    code: str | None


# The ``type`` OpenAI uses for each status the proxy emits.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
    508: "server_error",
}


class ProxyError(Exception):
    """A failure the proxy answers itself; ``code`` is a stable machine-readable reason."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        *,
        error_type: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.error_type = error_type or _TYPES.get(status, "server_error")
        self.headers = headers or []  # extra response headers, e.g. Retry-After on a 429

    def body(self) -> ErrorBody:
        return {"message": self.message, "type": self.error_type, "code": self.code}

    def json_bytes(self) -> bytes:
        return json.dumps({"error": self.body()}).encode()

    def sse_bytes(self) -> bytes:
        """The error as one SSE event followed by the end-of-stream marker (mid-stream failures)."""
        return b"data: " + self.json_bytes() + b"\n\ndata: [DONE]\n\n"


def bad_request(message: str, code: str = "invalid_request") -> ProxyError:
    return ProxyError(400, message, code)


def engine_failed(message: str, code: str = "engine_error") -> ProxyError:
    return ProxyError(502, message, code)


def engine_timeout(message: str, code: str = "engine_timeout") -> ProxyError:
    return ProxyError(504, message, code)
