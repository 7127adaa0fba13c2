"""RouterPanel tells a real vLLM server's engine type from its own endpoints (``nodes/engine_detect.py``):
by ``owned_by`` in ``/v1/models``, and by ``/version`` alone (as for a fork that names itself
otherwise), because a real vLLM has none of the other engines' endpoints."""

from __future__ import annotations

import pytest

from nodes import engine_detect

pytestmark = pytest.mark.real_engine


def test_a_real_vllm_server_is_detected_as_vllm(vllm_server) -> None:
    server = vllm_server("hybrid")
    found = engine_detect.detect(server.url, timeout=5.0)
    assert (found.engine_type, found.evidence) == ("vllm", "GET /v1/models: owned_by 'vllm'")
    assert found.models == [server.model]
    by_endpoints = engine_detect.detect_by_endpoints(server.url, timeout=5.0)
    assert by_endpoints.engine_type == "vllm"
    assert by_endpoints.evidence.startswith("GET /version answered {'version': '0.32")
