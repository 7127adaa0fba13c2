"""``python -m enginesim.demo``: the demo fleet ``make run`` starts (the Procfile's ``engines`` process).

Two hybrid NanoDeploy engines serve ``demo-chat``; a prefill and a decode engine serve ``demo-pd``. They
register themselves with NanoCtrl like ``nanodeploy serve`` does, so the registry sync finds them.
"""

from __future__ import annotations

import argparse

from enginesim.config import SimConfig
from enginesim.server import run

# (role, served model name, model path) of each engine, in port order
DEMO_FLEET: list[tuple[str, str, str]] = [
    ("hybrid", "demo-chat", "/models/demo-chat-8B"),
    ("hybrid", "demo-chat", "/models/demo-chat-8B"),
    ("prefill", "demo-pd", "/models/demo-pd-8B"),
    ("decode", "demo-pd", "/models/demo-pd-8B"),
]


def demo_configs(
    *,
    base_port: int = 8101,
    ctrl_address: str = "127.0.0.1:4479",
    ctrl_scope: str | None = None,
    heartbeat_interval: float = 5.0,
    ttft_ms: float = 20.0,
    itl_ms: float = 10.0,
) -> list[SimConfig]:
    """One NanoDeploy engine per ``DEMO_FLEET`` entry, on ``base_port`` and the ports after it."""
    return [
        SimConfig(
            engine="nanodeploy",
            host="127.0.0.1",
            port=base_port + offset,
            ttft_ms=ttft_ms,
            itl_ms=itl_ms,
            ctrl_address=ctrl_address,
            ctrl_scope=ctrl_scope or None,
            heartbeat_interval=heartbeat_interval,
            role=role,
            served_model_name=served_model_name,
            model_path=model_path,
        )
        for offset, (role, served_model_name, model_path) in enumerate(DEMO_FLEET)
    ]


def parse_args(argv: list[str] | None = None) -> list[SimConfig]:
    parser = argparse.ArgumentParser(
        prog="python -m enginesim.demo",
        description="Run the demo fleet of simulated NanoDeploy engines that register with NanoCtrl.",
    )
    parser.add_argument("--base-port", type=int, default=8101, help="first engine's port; the others follow")
    parser.add_argument("--ctrl-address", default="127.0.0.1:4479", help="NanoCtrl HOST:PORT")
    parser.add_argument("--ctrl-scope", default="")
    parser.add_argument("--heartbeat-interval", type=float, default=5.0)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    return demo_configs(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    run(parse_args())
