"""Run a simulated engine until SIGTERM or Ctrl-C (then unregister from NanoCtrl and exit 0)."""

from __future__ import annotations

import asyncio
import logging
import signal

from proxy.simulator.app import SimulatorApp
from proxy.simulator.config import SimConfig
from proxy.simulator.flavours.sglang import BootstrapApp, SglangFlavour
from proxy.simulator.http import HttpServer
from proxy.simulator.peer import close_sessions
from proxy.simulator.registration import Registrar

logger = logging.getLogger("proxy.simulator")


async def serve(config: SimConfig, *, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or a termination signal arrives)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    app = SimulatorApp(config)
    server = HttpServer(app, config.host, config.port)
    app.server = server
    if not config.faults.refuse_connections:
        await server.start()
    bootstrap: HttpServer | None = None
    if isinstance(app.flavour, SglangFlavour) and config.role == "prefill":
        bootstrap = HttpServer(BootstrapApp(app.flavour), config.host, config.bootstrap_port)
        await bootstrap.start()
    registrar = Registrar(config) if config.ctrl_address else None
    if registrar is not None:
        await registrar.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (an in-process test)
            break
    extra = f", bootstrap port {config.bootstrap_port}" if bootstrap else ""
    print(
        f"simulate_engine: {config.engine} {config.role} '{config.served_model_name}' "
        f"on http://{config.host}:{config.port}{extra}",
        flush=True,
    )
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        server.stop_listening()
        if registrar is not None:
            await registrar.stop()
        await server.close()
        if bootstrap is not None:
            await bootstrap.close()
        await close_sessions()


def run(config: SimConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        pass
    asyncio.run(serve(config))
