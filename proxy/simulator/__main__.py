"""``python -m proxy.simulator --engine ... --port ...``: the simulator without Django's start-up cost."""

from __future__ import annotations

from proxy.simulator.config import parse_args
from proxy.simulator.server import run

if __name__ == "__main__":
    run(parse_args())
