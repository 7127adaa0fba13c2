"""Command-line options of the simulator (``python -m enginesim``) and the config they build."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINES = ("nanodeploy", "dlengine", "vllm", "sglang", "lmdeploy", "openai")
ROLES = ("hybrid", "prefill", "decode")
KV_CONNECTORS = ("NixlConnector", "ExampleConnector")


@dataclass
class FaultOptions:
    """Faults switched on from the command line: the fields of ``POST /sim/faults`` but ``count``.

    ``faults.Faults`` extends it with ``count`` and the behaviour; a running engine works on its
    own ``Faults`` made from these, so a config's options are never changed.
    """

    error_rate: float = 0.0
    error_status: int = 500
    hang: bool = False
    slow_first_token_ms: float = 0.0
    close_after_chunks: int | None = None
    fail_health: bool = False
    refuse_connections: bool = False
    crash: bool = False


@dataclass(frozen=True)
class SimConfig:
    engine: str = "openai"
    role: str = "hybrid"
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = "sim-model"
    model_path: str = "/models/sim-model"
    ttft_ms: float = 5.0
    itl_ms: float = 2.0
    fast: bool = False
    bootstrap_port: int = 8998
    lmdeploy_version: str = "0.18.0"
    cache_session_id: bool = False
    tp_size: int = 1
    dp_size: int = 1
    max_model_len: int = 4096
    kv_connector: str = "NixlConnector"
    runner: str = "generate"
    pd_timeout_s: float = 10.0
    kv_block_size: int = 16
    eos_at_prefill_prob: float = 0.0
    natural_tokens: int | None = None
    created: int = 0  # every answer's ``created`` (0: the clock), for byte-for-byte comparisons
    record_requests: int = 200
    ctrl_address: str | None = None
    ctrl_scope: str | None = None
    ctrl_kind: str | None = None
    heartbeat_interval: float = 15.0
    proxy_url: str | None = None
    faults: FaultOptions = field(default_factory=FaultOptions)

    @property
    def accepted_model_names(self) -> list[str]:
        """Served name, model path without trailing slash, and its basename (deduplicated, in that order)."""
        path = self.model_path.rstrip("/")
        names = [self.served_model_name, path, path.rsplit("/", 1)[-1]]
        return [n for i, n in enumerate(names) if n and n not in names[:i]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the simulator's options on ``parser``."""
    parser.add_argument("--engine", choices=ENGINES, default="openai")
    parser.add_argument("--role", choices=ROLES, default="hybrid")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default="sim-model")
    parser.add_argument("--model-path", default="/models/sim-model")
    parser.add_argument("--ttft-ms", type=float, default=5.0, help="time to first token")
    parser.add_argument("--itl-ms", type=float, default=2.0, help="inter-token latency")
    parser.add_argument("--fast", action="store_true", help="no artificial latency; serve repeated requests from cache")
    parser.add_argument("--bootstrap-port", type=int, default=8998, help="SGLang prefill bootstrap server port")
    parser.add_argument(
        "--lmdeploy-version", default="0.18.0", help="LMDeploy release played (ids, error statuses): 0.14 to 0.18"
    )
    parser.add_argument(
        "--cache-session-id",
        action="store_true",
        help="LMDeploy: name the prefill's session in a cache_session_id answer field (not in 0.18)",
    )
    parser.add_argument("--tp-size", type=int, default=1, help="LMDeploy: tensor-parallel ranks reported")
    parser.add_argument("--dp-size", type=int, default=1, help="vLLM data-parallel ranks accepted")
    parser.add_argument("--max-model-len", type=int, default=4096, help="vLLM context length (prompt + output tokens)")
    parser.add_argument(
        "--kv-connector",
        choices=KV_CONNECTORS,
        default="NixlConnector",
        help="vLLM prefill/decode roles: NIXL-style kv_transfer_params, or none (ExampleConnector)",
    )
    parser.add_argument(
        "--runner",
        choices=("generate", "pooling"),
        default="generate",
        help="vLLM: a generation model (chat, completions, responses) or a pooling one (embeddings, score, rerank)",
    )
    parser.add_argument("--pd-timeout-s", type=float, default=10.0, help="how long one PD leg waits for the other")
    parser.add_argument("--kv-block-size", type=int, default=16, help="prompt tokens per KV block")
    parser.add_argument("--eos-at-prefill-prob", type=float, default=0.0, help="chance a PD prefill ends at once")
    parser.add_argument(
        "--natural-tokens", type=int, default=None, help="every answer's length before max_tokens (default 8..24)"
    )
    parser.add_argument(
        "--created",
        type=int,
        default=0,
        help="every answer's created time (Unix seconds; 0: the clock): answers comparable byte for byte",
    )
    parser.add_argument("--record-requests", type=int, default=200, help="how many requests /sim/requests keeps")
    parser.add_argument("--ctrl-address", default=None, help="NanoCtrl HOST:PORT to register with")
    parser.add_argument("--ctrl-scope", default=None)
    parser.add_argument("--ctrl-kind", default=None, help="entity kind (default: the engine name)")
    parser.add_argument("--heartbeat-interval", type=float, default=15.0)
    parser.add_argument(
        "--proxy-url",
        default=None,
        help="LMDeploy only: register once with this router (POST URL/nodes/add), as api_server --proxy-url does",
    )
    faults = parser.add_argument_group("faults (also settable at run time with POST /sim/faults)")
    faults.add_argument("--error-rate", type=float, default=0.0)
    faults.add_argument("--error-status", type=int, choices=(429, 500, 503), default=500)
    faults.add_argument("--hang", action="store_true", help="never answer inference requests")
    faults.add_argument("--slow-first-token-ms", type=float, default=0.0)
    faults.add_argument("--close-after-chunks", type=int, default=None, help="drop the connection after k chunks")
    faults.add_argument("--fail-health", action="store_true")
    faults.add_argument("--refuse-connections", action="store_true", help="do not listen (connections refused)")
    faults.add_argument("--crash", action="store_true", help="exit on the first inference request")
    parser.add_argument(
        "--fleet",
        default=None,
        help="several engines in this process: a JSON list (or a file holding one) of option objects, "
        'each over the command-line options, e.g. \'[{"engine": "vllm", "port": 8101}, {"port": 8102}]\'',
    )


def config_from_options(options: dict) -> SimConfig:
    """Build a ``SimConfig`` from parsed options (``vars`` of an argparse namespace)."""
    fault_fields = FaultOptions.__dataclass_fields__
    config_fields = SimConfig.__dataclass_fields__
    faults = FaultOptions(**{k: v for k, v in options.items() if k in fault_fields})
    values = {k: v for k, v in options.items() if k in config_fields and k != "faults"}
    return SimConfig(**values, faults=faults)


class FleetError(ValueError):
    """A ``--fleet`` value that does not describe engines."""


def configs_from_options(options: dict[str, Any]) -> list[SimConfig]:
    """One config, or one per ``--fleet`` entry (each entry's options over the command line's)."""
    fleet = options.get("fleet")
    if not fleet:
        return [config_from_options(options)]
    text = fleet if fleet.lstrip().startswith("[") else Path(fleet).read_text()
    try:
        entries = json.loads(text)
    except ValueError as exc:
        raise FleetError(f"--fleet is not JSON: {exc}") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise FleetError("--fleet must be a non-empty JSON list of objects")
    known = set(SimConfig.__dataclass_fields__) | set(FaultOptions.__dataclass_fields__)
    configs = []
    for entry in entries:
        entry = {k.replace("-", "_"): v for k, v in entry.items()}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise FleetError(f"unknown option(s) in --fleet entry: {', '.join(unknown)}")
        config = config_from_options({**options, **entry})
        if config.engine not in ENGINES or config.role not in ROLES:
            raise FleetError(f"bad engine or role in --fleet entry: {entry}")
        check_proxy_url(config)
        configs.append(config)
    ports = [c.port for c in configs]
    if len(set(ports)) != len(ports):
        raise FleetError("--fleet entries must have distinct ports")
    return configs


def check_proxy_url(config: SimConfig) -> None:
    """``--proxy-url`` is LMDeploy's way of joining a router; the other engines have none."""
    if config.proxy_url and config.engine != "lmdeploy":
        raise FleetError(f"--proxy-url is LMDeploy's option; engine {config.engine} has no such option")


def parse_args(argv: list[str] | None = None) -> list[SimConfig]:
    parser = argparse.ArgumentParser(prog="python -m enginesim", description="Simulated LLM inference engine")
    add_arguments(parser)
    options = vars(parser.parse_args(argv))
    try:
        if not options.get("fleet"):
            check_proxy_url(config_from_options(options))
        return configs_from_options(options)
    except (FleetError, OSError) as exc:
        parser.error(str(exc))
