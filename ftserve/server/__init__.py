"""The OpenAI-compatible HTTP server in front of any engine (ftserve/engine/base.py's interface).

``build_app(engine, settings)`` gives the ASGI app; ``serve(engine, settings, host, port, adapters)`` runs it on
uvicorn around a started engine and shuts down gracefully on SIGTERM. ``ftserve serve`` is the command line.
"""

from .app import build_app
from .run import serve
from .serving import ServerSettings

__all__ = ["ServerSettings", "build_app", "serve"]
