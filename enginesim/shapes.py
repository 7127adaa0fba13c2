"""JSON shapes the simulator's ``/sim/*`` API returns (what tests of this project and the proxy read)."""

from __future__ import annotations

from typing import Any, TypedDict


class RequestCounters(TypedDict):
    total: int
    by_endpoint: dict[str, int]
    by_status: dict[str, int]
    by_dp_rank: dict[str, int]
    in_flight: int
    completed: int
    cancelled: int  # the client closed the connection before the response was complete
    aborted: int  # the engine dropped the answer (injected close_after_chunks)
    faults_injected: int


class OutstandingKv(TypedDict):
    id: int | str
    blocks: int
    age_s: float


class KvLedgerSnapshot(TypedDict):
    allocated: int
    freed: int
    double_free: int
    unknown_free: int
    expired: int
    outstanding_count: int
    outstanding: list[OutstandingKv]


class SimStats(TypedDict):
    """``GET /sim/stats``."""

    engine: str
    role: str
    served_model_name: str
    host: str
    port: int
    pid: int
    uptime_s: float
    requests: RequestCounters
    kv: KvLedgerSnapshot
    pd: dict[str, Any]


class RecordedRequest(TypedDict):
    """One entry of ``GET /sim/requests``."""

    seq: int
    time: float
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    body_text: str | None
