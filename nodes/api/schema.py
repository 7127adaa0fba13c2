"""OpenAPI schema post-processing: document the error answers every operation can give, so clients
(and the schema-driven tests) know them: 400 validation errors naming the field, 401 without
credentials, 403 for non-staff writes, 404 for an unknown object, 405 and 415 for a wrong method or
content type, and 503 where an answer comes from the live state in Redis."""

from __future__ import annotations

from typing import Any

ERROR_SCHEMA = {
    "type": "object",
    "description": "`detail` for authentication, permission, lookup and parse errors; field names mapped to "
    "messages for validation errors; `error` on the DLRouter-compatible endpoints.",
    "additionalProperties": True,
}

ERRORS = {
    "400": "Invalid input: the fields at fault are named.",
    "401": "No or invalid credentials.",
    "403": "Authenticated, but not allowed (writes need a staff account).",
    "404": "No such object.",
    "405": "Method not allowed.",
    "409": "Conflict (another sync of this control plane is running).",
    "415": "Unsupported content type: send JSON.",
    "502": "The node or registry behind this action failed.",
    "503": "The live state (Redis) cannot be read.",
}

_WRITE_ONLY = {"415"}


def add_error_responses(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    components = result.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ERROR_SCHEMA
    ref = {"$ref": "#/components/schemas/Error"}
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            for status, description in ERRORS.items():
                if status in _WRITE_ONLY and method == "get":
                    continue
                if status in {"409", "502"} and not (path.endswith("/sync/") or path.startswith("/nodes/")):
                    continue
                if status == "503" and not path.startswith("/api/requests/"):
                    continue
                responses.setdefault(
                    status, {"description": description, "content": {"application/json": {"schema": ref}}}
                )
    return result
