"""Measure the simulator's fast mode: non-streaming requests/s under ``wrk -t1 -c32 -d5s``.

    .venv/bin/python bench/sim_throughput.py [--duration 5] [--connections 32] [--stream]

The simulator runs pinned to one core (``taskset``, when available) and wrk to another, so the figure is
what one simulator core serves. The proxy benchmark uses the same fast simulator as its DIRECT baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from enginesim.testing import run_simulator


def lua_script(body: dict) -> str:
    payload = json.dumps(body).replace("\\", "\\\\").replace("'", "\\'")
    return f"""wrk.method = "POST"
wrk.body = '{payload}'
wrk.headers["Content-Type"] = "application/json"
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--stream", action="store_true", help="unpaced 64-token streams instead")
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    body: dict[str, Any] = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "[[len=16]] hello"}],
        "max_tokens": 16,
    }
    if args.stream:
        body.update(stream=True, max_tokens=64)
        body["messages"][0]["content"] = "[[len=64]] hello"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(lua_script(body))
    with run_simulator(extra_args=["--fast", "--record-requests=100"]) as sim:
        if pin:
            subprocess.run(["taskset", "-p", "-c", "0", str(sim.proc.pid)], check=True, capture_output=True)
        command = [wrk, "-t1", f"-c{args.connections}", f"-d{args.duration}s", "-s", script.name]
        command.append(sim.url + "/v1/chat/completions")
        if pin:
            command = ["taskset", "-c", "1", *command]
        result = subprocess.run(command, check=True, capture_output=True, text=True)
        stats = sim.stats()["requests"]
    os.unlink(script.name)
    match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", result.stdout)
    if match is None:
        print(result.stdout, file=sys.stderr)
        return 1
    kind = "streaming (64 tokens)" if args.stream else "non-streaming"
    print(result.stdout.rstrip())
    rate = float(match.group(1))
    print(f"simulator fast mode, {kind}, wrk -t1 -c{args.connections} -d{args.duration}s: {rate:,.0f} req/s")
    print(f"non-2xx: {errors.group(1) if errors else 0}; simulator counted {stats['completed']} completed requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
