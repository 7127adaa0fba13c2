"""Run simulated engines until SIGTERM or Ctrl-C (then unregister from NanoCtrl and exit 0)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

from enginesim.app import SimulatorApp
from enginesim.config import SimConfig
from enginesim.flavours.sglang import BootstrapApp, SglangFlavour
from enginesim.http import HttpServer
from enginesim.peer import close_sessions
from enginesim.proxy_registration import register_with_proxy
from enginesim.registration import Registrar

logger = logging.getLogger("enginesim")


class RunningEngine:
    """One simulated engine: its HTTP server, its SGLang bootstrap server, its NanoCtrl registration
    or (LMDeploy) its one registration with a router."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.app = SimulatorApp(config)
        self.server = HttpServer(self.app, config.host, config.port)
        self.app.server = self.server
        self.bootstrap: HttpServer | None = None
        if isinstance(self.app.flavour, SglangFlavour) and config.role == "prefill":
            self.bootstrap = HttpServer(BootstrapApp(self.app.flavour), config.host, config.bootstrap_port)
        self.registrar = Registrar(config) if config.ctrl_address else None

    async def start(self) -> None:
        if self.config.proxy_url:
            # Before listening, as LMDeploy does (its lifespan start-up runs before uvicorn binds).
            await register_with_proxy(self.config)
        if not self.config.faults.refuse_connections:
            await self.server.start()
        if self.bootstrap is not None:
            await self.bootstrap.start()
        if self.registrar is not None:
            await self.registrar.start()
        config = self.config
        extra = f", bootstrap port {config.bootstrap_port}" if self.bootstrap else ""
        print(
            f"enginesim: {config.engine} {config.role} '{config.served_model_name}' "
            f"on http://{config.host}:{config.port}{extra}",
            flush=True,
        )

    async def stop(self) -> None:
        """Stop accepting, unregister, then close open connections (in-flight requests are cancelled)."""
        self.server.stop_listening()
        if self.registrar is not None:
            await self.registrar.stop()
        await self.server.close()
        if self.bootstrap is not None:
            await self.bootstrap.close()


async def serve(
    configs: SimConfig | Sequence[SimConfig],
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve every engine until ``stop`` is set (or a termination signal arrives)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    engines = [RunningEngine(c) for c in ([configs] if isinstance(configs, SimConfig) else configs)]
    try:
        for engine in engines:
            await engine.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread (an in-process test)
                break
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        for engine in engines:
            await engine.stop()
        await close_sessions()


def run(configs: SimConfig | Sequence[SimConfig]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        pass
    asyncio.run(serve(configs))
