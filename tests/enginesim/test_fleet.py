"""Several simulated engines in one process (``--fleet``), e.g. the demo fleet of ``make run``."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from enginesim import expected_completion
from enginesim.testing import REPO_ROOT, free_port, run_simulator, wait_listening


def test_one_process_serves_a_prefill_and_a_decode_that_complete_a_pd_request():
    prefill_port, decode_port = free_port(), free_port()
    fleet = [{"role": "prefill", "port": prefill_port}, {"role": "decode", "port": decode_port}]
    with run_simulator(engine="dlengine", port=prefill_port, extra_args=["--fleet", json.dumps(fleet)]) as sim:
        wait_listening("127.0.0.1", decode_port, sim.proc)
        body = {"model": "sim-model", "prompt": "[[len=5]] fleet", "kv_transfer_params": {"do_remote_decode": True}}
        params = httpx.post(sim.url + "/v1/completions", json=body, timeout=10).json()["kv_transfer_params"]
        body["kv_transfer_params"] = params
        decode_url = f"http://127.0.0.1:{decode_port}"
        answer = httpx.post(decode_url + "/v1/completions", json=body, timeout=10).json()
        assert answer["choices"][0]["text"] == expected_completion("[[len=5]] fleet")
        roles = [httpx.get(url + "/sim/stats").json()["role"] for url in (sim.url, decode_url)]
        assert roles == ["prefill", "decode"]


def test_a_bad_fleet_is_refused_with_a_message():
    argv = [sys.executable, "-m", "enginesim", "--fleet", '[{"port": 1, "colour": "red"}]']
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "colour" in result.stderr
