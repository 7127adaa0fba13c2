"""The demo fleet ``make run`` starts (``python -m enginesim.demo``, the Procfile's ``engines`` process)."""

from __future__ import annotations

from enginesim.demo import parse_args


def test_it_runs_two_hybrid_engines_and_a_prefill_decode_pair_on_consecutive_ports() -> None:
    configs = parse_args(["--base-port=9100", "--ctrl-address=127.0.0.1:5000"])
    assert [(c.port, c.role, c.served_model_name) for c in configs] == [
        (9100, "hybrid", "demo-chat"),
        (9101, "hybrid", "demo-chat"),
        (9102, "prefill", "demo-pd"),
        (9103, "decode", "demo-pd"),
    ]
    assert {c.engine for c in configs} == {"nanodeploy"}
    assert {c.ctrl_address for c in configs} == {"127.0.0.1:5000"}


def test_every_engine_registers_in_the_default_scope_with_a_five_second_heartbeat_unless_told() -> None:
    defaults = parse_args([])
    assert {(c.ctrl_scope, c.heartbeat_interval, c.ttft_ms, c.itl_ms) for c in defaults} == {(None, 5.0, 20.0, 10.0)}
    scoped = parse_args(["--ctrl-scope=demo", "--heartbeat-interval=1", "--ttft-ms=0", "--itl-ms=0"])
    assert {(c.ctrl_scope, c.heartbeat_interval, c.ttft_ms, c.itl_ms) for c in scoped} == {("demo", 1.0, 0.0, 0.0)}
