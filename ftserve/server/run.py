"""Run the app on uvicorn around a started engine, and shut down gracefully.

On SIGTERM or SIGINT the server stops accepting connections, answers new requests on open connections with
503, lets in-flight requests (streams included) finish, stops the engine and returns, so the process exits 0.
With a shutdown timeout, requests still running after it are cancelled; and if the process has still not
ended ``EXIT_GRACE`` seconds later (a thread that cannot be interrupted), it ends itself, with status 0.

Connections are bounded (connections.py): header timeout, open-connection cap; request bodies are timed by
``BodyLimitMiddleware``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import signal
import sys
import threading

import uvicorn

from ..engine.base import Engine
from .app import build_app
from .connections import BoundedH11Protocol
from .settings import DEFAULT_HOST, DEFAULT_LOG_LEVEL, DEFAULT_PORT, ServerSettings

logger = logging.getLogger("ftserve.server")

EXIT_GRACE = 5.0  # seconds past the shutdown timeout for the engine to stop, before the process ends itself
SPARE_FILES = 256  # file descriptors beyond the connections: model and adapter files, pipes, the engine's own


def reserve_file_descriptors(max_connections: int) -> None:
    """Raise the soft open-file limit toward the hard one so ``max_connections`` sockets fit beside the files the
    server reads (the soft limit is often 1024); where the hard limit is lower, say so once: beyond it, accept
    fails with "Too many open files" before the connection cap can answer 503."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        if raised < wanted:
            logger.warning("--max-connections %d needs about %d open files, but this process may open only %d "
                           "(ulimit -n): lower --max-connections or raise the limit", max_connections, wanted,
                           raised)


class _GracefulServer(uvicorn.Server):
    """uvicorn's server, minus re-raising the signal after a graceful shutdown (which would make the exit
    status that of a killed process), and telling the app to refuse new work while it drains."""

    def __init__(self, config: uvicorn.Config, on_exit) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)


def _exit_after(seconds: float) -> None:
    """A daemon timer that ends the process after ``seconds``: the last resort of a bounded shutdown."""

    def end() -> None:
        logger.error("the server did not stop within %.1f s of the signal; ending the process", seconds)
        sys.stderr.flush()
        os._exit(0)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()


async def serve(engine: Engine, settings: ServerSettings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                adapters: dict[str, str] | None = None, log_level: str = DEFAULT_LOG_LEVEL,
                shutdown_timeout: float | None = None) -> None:
    """Start ``engine``, load ``adapters`` (name -> folder), serve until a signal, then stop the engine."""
    reserve_file_descriptors(settings.max_connections)
    await engine.start()
    try:
        for name, path in (adapters or {}).items():
            await engine.load_adapter(name, path)
            logger.info("loaded adapter %s from %s", name, path)
        app = build_app(engine, settings)
        protocol = functools.partial(BoundedH11Protocol, header_timeout=settings.header_timeout,
                                     max_connections=settings.max_connections)
        config = uvicorn.Config(app, host=host, port=port, lifespan="off", log_level=log_level, http=protocol,
                                ws="none", timeout_graceful_shutdown=shutdown_timeout,
                                access_log=log_level == "debug")
        stopping = threading.Event()

        def drain() -> None:
            app.state.serving.draining = True
            if shutdown_timeout is not None and not stopping.is_set():
                _exit_after(shutdown_timeout + EXIT_GRACE)
            stopping.set()

        await _GracefulServer(config, drain).serve()
    finally:
        await engine.shutdown()
