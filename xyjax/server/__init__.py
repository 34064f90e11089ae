"""``xyjax serve``: an OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn).

``protocol``: request models and response objects; ``engine_loop``: the thread that drives ``Engine.step()``;
``app``: the routes; ``metrics``: the Prometheus registry.
"""

from __future__ import annotations

import signal

import uvicorn

from xyjax.llm import LLM
from xyjax.server.app import build_app
from xyjax.server.engine_loop import EngineLoop

__all__ = ["EngineLoop", "build_app", "serve"]


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
          **engine_options) -> int:
    """Load ``model``, compile every bucket, then serve until SIGINT/SIGTERM. In-flight requests get
    ``shutdown_timeout`` seconds to finish, then are aborted. Returns the exit status (0)."""
    llm = LLM(model, dtype=dtype, **engine_options)     # compiles (or loads) every bucket before serving
    engine_loop = EngineLoop(llm)
    engine_loop.start()
    app = build_app(engine_loop, served_model_name or llm.model.name, max_body_bytes)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_timeout + 5,
                            log_level="info")
    # uvicorn re-raises the signal it stopped for once it is done, to the handler it found; a no-op one
    # lets the process exit with status 0 after its graceful shutdown.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    _Server(config, engine_loop, shutdown_timeout).run()
    engine_loop.close(0)
    engine_loop.join(timeout=10)
    return 0
