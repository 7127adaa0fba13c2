"""GET /health/ready: 200 when every model can be served by healthy nodes, 503 naming what is
missing otherwise; a PD model needs a healthy prefill and a healthy decode node."""

from __future__ import annotations

from proxy import snapshot as snapshots
from proxy.snapshot import PolicyView

from .conftest import call, make_snapshot


async def test_every_model_ready_answers_200(proxy_app):
    snapshots.install(
        make_snapshot(
            [
                {"url": "http://h:1", "models": ["chat"]},
                {"url": "http://p:1", "models": ["pd"], "role": "prefill"},
                {"url": "http://d:1", "models": ["pd"], "role": "decode"},
            ]
        )
    )
    response = await call(proxy_app, "GET", "/health/ready")
    assert response.status == 200
    report = response.json()
    assert report["ready"] is True
    assert report["models"]["chat"] == {
        "ready": True,
        "mode": "hybrid",
        "healthy_nodes": {"hybrid": 1},
        "reasons": [],
        "panic": {},
    }
    assert report["models"]["pd"]["mode"] == "pd"
    assert report["models"]["pd"]["healthy_nodes"] == {"prefill": 1, "decode": 1}


async def test_a_pd_model_without_a_healthy_decode_node_is_not_ready(proxy_app):
    snapshots.install(
        make_snapshot(
            [
                {"url": "http://p:1", "models": ["pd"], "role": "prefill"},
                {"url": "http://d:1", "models": ["pd"], "role": "decode", "health": "unhealthy"},
            ],
            default_policy=PolicyView(serving_mode="pd"),
        )
    )
    response = await call(proxy_app, "GET", "/health/ready")
    assert response.status == 503
    assert response.json()["models"]["pd"]["reasons"] == ["no healthy decode node"]


async def test_unknown_health_is_not_ready_and_an_open_breaker_counts_as_unhealthy(proxy_app):
    snapshots.install(
        make_snapshot(
            [{"url": "http://a:1", "models": ["m"], "health": "unknown"}, {"url": "http://b:1", "models": ["n"]}]
        )
    )
    for _ in range(proxy_app.router.breakers.threshold):
        proxy_app.router.breakers.failure(2)
    response = await call(proxy_app, "GET", "/health/ready")
    assert response.status == 503
    models = response.json()["models"]
    assert models["m"]["reasons"] == ["no healthy hybrid node"]
    assert models["n"]["reasons"] == ["no healthy hybrid node"]
