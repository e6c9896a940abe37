"""The OpenAI-compatible HTTP server in front of any engine (ftserve/engine/base.py's interface).

``app.build_app(engine, settings)`` gives the ASGI app; ``run.serve(engine, settings, host, port, adapters)`` runs
it on uvicorn around a started engine and shuts down gracefully on SIGTERM; ``settings.ServerSettings`` is what
they need besides the engine. ``ftserve serve`` is the command line. Nothing is imported here, so
``ftserve.server.settings`` (read by ``ftserve serve --help``) loads without FastAPI.
"""
