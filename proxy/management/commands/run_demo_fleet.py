"""``manage.py run_demo_fleet``: the simulated engines `make run` starts as its demo fleet.

Two hybrid engines serve ``demo-chat``; a prefill and a decode engine serve ``demo-pd``. They
register themselves with NanoCtrl like ``nanodeploy serve`` does, so the registry sync finds them.
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand

from enginesim.config import parse_args
from enginesim.server import run

DEMO_FLEET = [
    {"role": "hybrid", "served_model_name": "demo-chat", "model_path": "/models/demo-chat-8B"},
    {"role": "hybrid", "served_model_name": "demo-chat", "model_path": "/models/demo-chat-8B"},
    {"role": "prefill", "served_model_name": "demo-pd", "model_path": "/models/demo-pd-8B"},
    {"role": "decode", "served_model_name": "demo-pd", "model_path": "/models/demo-pd-8B"},
]


class Command(BaseCommand):
    requires_system_checks: list[str] = []
    help = "Run the demo fleet of simulated NanoDeploy engines that register with NanoCtrl."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--base-port", type=int, default=8101, help="First engine's port; the others follow.")
        parser.add_argument("--ctrl-address", default="127.0.0.1:4479", help="NanoCtrl host:port.")
        parser.add_argument("--ctrl-scope", default="")
        parser.add_argument("--heartbeat-interval", type=float, default=5.0)
        parser.add_argument("--ttft-ms", type=float, default=20.0)
        parser.add_argument("--itl-ms", type=float, default=10.0)

    def handle(self, *args, base_port: int, ctrl_address: str, ctrl_scope: str, **options) -> None:
        fleet = [{**entry, "port": base_port + offset} for offset, entry in enumerate(DEMO_FLEET)]
        argv = [
            "--engine=nanodeploy",
            "--host=127.0.0.1",
            f"--ctrl-address={ctrl_address}",
            f"--heartbeat-interval={options['heartbeat_interval']}",
            f"--ttft-ms={options['ttft_ms']}",
            f"--itl-ms={options['itl_ms']}",
            f"--fleet={json.dumps(fleet)}",
        ]
        if ctrl_scope:
            argv.append(f"--ctrl-scope={ctrl_scope}")
        run(parse_args(argv))
