"""``python -m enginesim --engine ... --port ...``: one simulated engine, or several with ``--fleet``."""

from __future__ import annotations

from enginesim.config import parse_args
from enginesim.server import run

if __name__ == "__main__":
    run(parse_args())
