"""``xyjax serve``: an OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn).

``protocol``: request models and response objects; ``engine_loop``: the thread that drives ``Engine.step()``;
``app``: the routes; ``metrics``: the Prometheus registry.
"""

from __future__ import annotations

import signal

import jax
import uvicorn

from models import loader
from xyjax.engine import distributed
from xyjax.llm import LLM
from xyjax.server.app import build_app
from xyjax.server.engine_loop import EngineLoop, Replicas

__all__ = ["EngineLoop", "Replicas", "build_app", "serve"]


class _Server(uvicorn.Server):
    """uvicorn's server, which on SIGINT/SIGTERM also tells the engine loop to stop admitting and to abort
    what still runs after the grace period."""

    def __init__(self, config: uvicorn.Config, engine_loop: EngineLoop, grace_seconds: float):
        super().__init__(config)
        self.engine_loop, self.grace_seconds = engine_loop, grace_seconds

    def handle_exit(self, sig, frame) -> None:
        self.engine_loop.close(self.grace_seconds)
        super().handle_exit(sig, frame)


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32",
          served_model_name: str | None = None, max_body_bytes: int = 1 << 20, shutdown_timeout: float = 30.0,
          data_parallel_size: int = 1, coordinator: str | None = None, num_processes: int = 1, process_id: int = 0,
          heartbeat_timeout: int = 10, **engine_options) -> int:
    """Load ``model``, compile every bucket, then serve until SIGINT/SIGTERM. In-flight requests get
    ``shutdown_timeout`` seconds to finish, then are aborted. Returns the exit status (0).

    ``data_parallel_size``: replicas of the engine, each on its own tensor_parallel_size devices, behind this one
    server (``Replicas``). ``coordinator`` (host:port), ``num_processes``, ``process_id``: one process of a
    ``jax.distributed`` job (``xyjax.engine.distributed``): process 0 serves HTTP and schedules; the others run
    its steps on their devices until it stops."""
    if coordinator:
        distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout)
    elif num_processes != 1:
        raise ValueError(f"num_processes={num_processes} needs a coordinator address (--coordinator HOST:PORT)")
    tp = engine_options.get("tensor_parallel_size", 1)
    devices = jax.devices()
    if data_parallel_size < 1 or (data_parallel_size > 1 and coordinator):
        raise ValueError(f"data_parallel_size must be >= 1 and is served by one process, got {data_parallel_size}"
                         f"{' with a coordinator' if coordinator else ''}")
    if tp * data_parallel_size > len(devices):
        raise ValueError(f"data_parallel_size={data_parallel_size} x tensor_parallel_size={tp} needs "
                         f"{tp * data_parallel_size} devices, {len(devices)} available")
    loaded = loader.load(model, dtype=dtype)
    llms = [LLM(loaded, devices=devices[r * tp:(r + 1) * tp] if data_parallel_size > 1 else None, **engine_options)
            for r in range(data_parallel_size)]      # each compiles (or loads) every bucket before serving
    if jax.process_index() != 0:
        distributed.follow(llms[0].engine)
        return 0
    engine_loop = EngineLoop(llms[0]) if data_parallel_size == 1 else Replicas(llms)
    engine_loop.start()
    app = build_app(engine_loop, served_model_name or loaded.name, max_body_bytes)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_timeout + 5,
                            log_level="info")
    # uvicorn re-raises the signal it stopped for once it is done, to the handler it found; a no-op one
    # lets the process exit with status 0 after its graceful shutdown.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    _Server(config, engine_loop, shutdown_timeout).run()
    engine_loop.close(0)
    engine_loop.join(timeout=10)
    llms[0].engine.close()          # releases the other processes of a distributed job
    return 0
