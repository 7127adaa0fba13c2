"""Injected faults: set from flags at start-up and at run time with ``POST /sim/faults``."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from typing import Any

from enginesim.config import FaultOptions

ERROR_STATUSES = (429, 500, 503)


class FaultError(ValueError):
    """A ``POST /sim/faults`` body that does not describe faults."""


@dataclass
class Faults(FaultOptions):
    """The active faults.

    Request-level faults (``error_rate``, ``hang``, ``slow_first_token_ms``, ``close_after_chunks``,
    ``crash``) apply to inference requests only. With ``count`` set they apply to the next ``count``
    inference requests and then switch off, which makes tests deterministic.
    """

    count: int | None = None

    @classmethod
    def from_options(cls, options: FaultOptions) -> Faults:
        return cls(**asdict(options))

    @classmethod
    def from_json(cls, body: Any) -> Faults:
        if not isinstance(body, dict):
            raise FaultError("faults must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise FaultError(f"unknown fault(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        faults = cls(**body)
        faults.validate()
        return faults

    def validate(self) -> None:
        if not isinstance(self.error_rate, int | float) or not 0.0 <= self.error_rate <= 1.0:
            raise FaultError("error_rate must be a number between 0 and 1")
        if self.error_status not in ERROR_STATUSES:
            raise FaultError(f"error_status must be one of {ERROR_STATUSES}")
        if not isinstance(self.slow_first_token_ms, int | float) or self.slow_first_token_ms < 0:
            raise FaultError("slow_first_token_ms must be a non-negative number")
        for name in ("close_after_chunks", "count"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise FaultError(f"{name} must be a non-negative integer or null")
        for name in ("hang", "fail_health", "refuse_connections", "crash"):
            if not isinstance(getattr(self, name), bool):
                raise FaultError(f"{name} must be true or false")

    @property
    def request_level_active(self) -> bool:
        return bool(
            self.error_rate
            or self.hang
            or self.slow_first_token_ms
            or self.close_after_chunks is not None
            or self.crash
        )

    @property
    def any_active(self) -> bool:
        return self.request_level_active or self.fail_health or self.refuse_connections

    def take(self) -> RequestFaults | None:
        """The faults to apply to one inference request (consuming one from ``count``)."""
        if not self.request_level_active or self.count == 0:
            return None
        if self.count is not None:
            self.count -= 1
        error = self.error_rate > 0 and (self.error_rate >= 1.0 or random.random() < self.error_rate)
        applied = RequestFaults(
            error_status=self.error_status if error else None,
            hang=self.hang,
            slow_first_token_ms=self.slow_first_token_ms,
            close_after_chunks=self.close_after_chunks,
            crash=self.crash,
        )
        if self.count == 0:
            self.error_rate, self.hang, self.slow_first_token_ms = 0.0, False, 0.0
            self.close_after_chunks, self.crash, self.count = None, False, None
        return applied

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RequestFaults:
    error_status: int | None
    hang: bool
    slow_first_token_ms: float
    close_after_chunks: int | None
    crash: bool
