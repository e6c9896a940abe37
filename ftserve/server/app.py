"""The OpenAI-compatible HTTP app in front of any engine: routes, error objects, auth, limits, metrics.

Routes (vLLM's): GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/load_lora_adapter
and /v1/unload_lora_adapter (with ``enable_adapter_api``), POST /tokenize and /detokenize, GET /health,
GET /metrics, and GET /openapi.json (the request models' schema; behind the API key when one is set).
"""

from __future__ import annotations

import asyncio
import time
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.base import Engine
from ..errors import AdapterFileError, FtserveError
from ..files.strict_json import StrictJSONError, loads_strict
from ..version import __version__
from . import openapi
from .errors import APIError, error_body, from_exception, validation_error
from .metrics import ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraAdapterRequest,
    TokenizeRequest,
    UnloadLoraAdapterRequest,
    model_card,
)
from .security import ApiKeyMiddleware, BodyLimitMiddleware, confine, send_error
from .serving import OpenAIServing, ServerSettings, constraint_errors

BodyT = TypeVar("BodyT", bound=BaseModel)
STREAMS = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}
BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
          "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest,
          "/v1/load_lora_adapter": LoadLoraAdapterRequest, "/v1/unload_lora_adapter": UnloadLoraAdapterRequest}
ROUTES = ("/openapi.json", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter", "/tokenize", "/detokenize", "/health", "/metrics")


class UnexpectedErrorMiddleware:
    """Turns an exception no handler took into a 500 error object inside the app, logged once.

    Starlette's own catch-all runs outside every user middleware and re-raises, so the answer would skip the
    metrics and uvicorn would drop the keep-alive connection. Here the 500 is an ordinary response: counted,
    and the connection stays usable. If the response had started (a stream), it is ended cleanly instead.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = finished = False

        async def tracked(message):
            nonlocal started, finished
            started = started or message["type"] == "http.response.start"
            finished = message["type"] == "http.response.body" and not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            err = from_exception(exc)  # logs the traceback
            if finished:
                return
            if started:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await send_error(send, err.status, err.message, err.code, err.headers())


class HttpMetricsMiddleware:
    """Counts every answer by route and status, including those the auth and size guards give."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                status = str(message["status"])
                self.metrics.http_requests.labels(route=route, status=status).inc()
                if message["status"] >= 400:
                    self.metrics.errors.labels(route=route, status=status).inc()
            await send(message)

        await self.app(scope, receive, counted)


INLINE_BODY_BYTES = 64 * 1024  # bodies up to this size are parsed on the event loop, larger ones in a thread


def decode_body(raw: bytes, model: type[BodyT]) -> BodyT:
    """``raw`` as ``model``, or the 400 that names what is wrong with it. The JSON is read by the same strict,
    bounded reader as adapter and checkpoint files (``loads_strict``: depth bounded before parsing, no ``NaN``
    or ``Infinity``, no integers beyond 4300 digits, no lone surrogates), then validated."""
    try:
        data = loads_strict(raw, what="The request body")
    except StrictJSONError as exc:
        raise APIError(400, f"{exc.message}.", param=exc.path,
                       code="invalid_value" if exc.path else "invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


async def parse(request: Request, model: type[BodyT]) -> BodyT:
    """The JSON body as ``model``, whatever Content-Type the client sent; 400 naming the field otherwise.
    A large body is decoded and validated in a worker thread: a 4 MiB list of token ids takes seconds, during
    which the event loop would answer nobody, /health included."""
    raw = await request.body()
    if len(raw) <= INLINE_BODY_BYTES:
        return decode_body(raw, model)
    return await asyncio.to_thread(decode_body, raw, model)


def disconnect_of(request: Request):
    """A coroutine function that returns once the client of ``request`` (whose body is read) disconnects."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return disconnected


def build_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The ASGI app. The engine must be started (and stopped) by the caller; see ``run.serve``."""
    metrics = ServerMetrics(engine)
    serving = OpenAIServing(engine, settings, metrics)
    started = int(time.time())
    app = FastAPI(title="ftserve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.serving = serving

    def error_response(exc: BaseException) -> JSONResponse:
        err = from_exception(exc)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = (f"No route {request.method} {request.url.path}" if exc.status_code in (404, 405)
                   else str(exc.detail))
        return JSONResponse(error_body(exc.status_code, message, code="not_found" if exc.status_code == 404
                                       else None), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(FtserveError)
    async def _ours(request: Request, exc: FtserveError):
        return error_response(exc)

    @app.get("/health", responses={503: {"description": "Shutting down, the engine has died, or every prompt "
                                                        "rendering worker is stuck",
                                         "content": {"application/json": {}}}})
    async def health():
        if serving.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not engine.healthy():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        stuck = serving.renders.saturated()
        if stuck:
            return JSONResponse({"status": "saturated", "reason": stuck}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        base = settings.served_model_name
        cards = [model_card(base, started, settings.model_path, None, engine.max_model_len)]
        cards += [model_card(a.name, int(a.loaded_at), a.path, base, engine.max_model_len)
                  for a in engine.list_adapters()]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions", responses=STREAMS)
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        with constraint_errors(body):
            return await serving.completions(body, disconnect_of(request))

    @app.post("/v1/chat/completions", responses=STREAMS)
    async def chat_completions(request: Request):
        body = await parse(request, ChatCompletionRequest)
        with constraint_errors(body):
            return await serving.chat(body, disconnect_of(request))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await parse(request, TokenizeRequest)
        # Seconds for a 4 MiB prompt, and messages render the model's chat template: on the render workers.
        return await serving.renders.run(serving.tokenize, body, lane=body.model or "")

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await parse(request, DetokenizeRequest)
        return await asyncio.to_thread(serving.detokenize, body)

    def adapter_api_enabled(route: str) -> None:
        if not settings.enable_adapter_api:
            raise APIError(404, f"{route} is disabled: start the server with --enable-adapter-api and "
                                f"--adapter-root DIR to load and unload adapters at runtime.",
                           code="adapter_api_disabled")

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(request: Request):
        adapter_api_enabled("/v1/load_lora_adapter")
        body = await parse(request, LoadLoraAdapterRequest)
        if body.load_inplace:
            raise APIError(400, "`load_inplace` is not supported: unload the adapter, then load it again.",
                           param="load_inplace", code="unsupported_parameter")
        if body.lora_name == settings.served_model_name:
            raise APIError(400, f"`{body.lora_name}` is the base model's name; choose another adapter name.",
                           param="lora_name", code="invalid_value")
        path = confine(settings.adapter_root, body.lora_path)
        # The engine checks every file of the folder against the root, now and whenever it reads it again.
        try:
            await engine.load_adapter(body.lora_name, str(path), root=settings.adapter_root)
        except AdapterFileError as exc:  # AdapterLoadError is one
            raise from_exception(exc, param="lora_path") from exc  # what was wrong with the folder it names
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(request: Request):
        adapter_api_enabled("/v1/unload_lora_adapter")
        body = await parse(request, UnloadLoraAdapterRequest)
        if not any(a.name == body.lora_name for a in engine.list_adapters()):
            raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name",
                           code="adapter_not_found")
        await engine.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    openapi.install(app, BODIES, __version__)

    # Outermost last: metrics see every answer, auth runs before the body is read.
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes, timeout=settings.body_timeout)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    return app

