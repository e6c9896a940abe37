"""What stands between the network and the handlers: API keys, body size, and adapter paths.

- ``ApiKeyMiddleware``: every ``/v1`` route, ``/tokenize`` and ``/detokenize`` need ``Authorization: Bearer
  KEY``; the key is compared in constant time (``hmac.compare_digest``) so response timing leaks nothing
  about it. ``/health`` and ``/metrics`` stay open, as in vLLM, for probes and scrapers.
- ``BodyLimitMiddleware``: a body over the limit gets 413 before any handler or JSON parser sees it, whether
  the client declares a Content-Length (answered before the body is read) or streams chunks; a body that
  stalls gets 408.
- ``confine``: the runtime load API reads adapter folders only under ``--adapter-root``; ``..``, absolute
  paths elsewhere and symlinks that lead out are refused. That covers the folder named; the files in it
  (a weights file that is a symlink to a file outside, say) are checked by the engine, which is given the
  root and checks the whole folder before every read of it (ftserve/confinement.py).
"""

from __future__ import annotations

import asyncio
import hmac
import os
from pathlib import Path, PurePosixPath

from ..files.confinement import is_inside
from .errors import APIError, error_bytes


async def send_error(send, status: int, message: str, code: str, headers: dict[str, str] | None = None,
                     more_body: bool = False) -> None:
    """An error object as the whole answer; with ``more_body``, the caller ends the response (its length is
    declared, so the client has the whole answer already)."""
    body = error_bytes(status, message, code=code)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": more_body})


# Besides /v1: vLLM leaves these open, but they name served models (and the schema, the adapter API's shape).
PROTECTED = ("/tokenize", "/detokenize", "/openapi.json")


class ApiKeyMiddleware:
    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not (scope["path"].startswith("/v1") or scope["path"] in PROTECTED):
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if given is None:
            return await send_error(send, 401, "Missing API key: send the header `Authorization: Bearer KEY` "
                                               "with the key the server was started with.", "missing_api_key",
                                    {"WWW-Authenticate": "Bearer"})
        scheme, _, token = given.strip().partition(b" ")
        # Compare even when the scheme is wrong, so that the time taken says nothing either way.
        matches = hmac.compare_digest(token.strip(), self.expected)
        if scheme.lower() != b"bearer" or not matches:
            return await send_error(send, 401, "Incorrect API key provided.", "invalid_api_key",
                                    {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the whole body (at most ``limit`` bytes) before the app runs, then replays it.

    A declared Content-Length over the limit is answered 413 at once, before any of the body is read (a client
    that sends ``Expect: 100-continue`` never sends it); a body that grows past the limit is answered 413 when
    it does; a body that pauses for more than ``timeout`` seconds between two parts is answered 408. Each of
    these closes the connection, but only after reading on what the client still sends (at most
    ``DRAIN_BYTES``, each part within ``timeout``): a client that writes its whole body before reading the
    answer, as most do, then gets the error instead of a reset connection.
    """

    DRAIN_BYTES = 64 * 1024 * 1024

    def __init__(self, app, limit: int, timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def _next(self, receive) -> dict | None:
        """The next body message, or None if none came within the timeout."""
        try:
            return await asyncio.wait_for(receive(), self.timeout)
        except TimeoutError:
            return None

    async def _refuse(self, receive, send, status: int, message: str, code: str, more: bool) -> None:
        await send_error(send, status, message, code, {"Connection": "close"}, more_body=more)
        if not more:
            return
        drained = 0
        while more and drained < self.DRAIN_BYTES:
            part = await self._next(receive)
            if part is None or part["type"] == "http.disconnect":
                break
            drained += len(part.get("body", b""))
            more = part.get("more_body", False)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _too_large(self, receive, send, more: bool) -> None:
        await self._refuse(receive, send, 413, f"The request body is larger than this server's limit of {self.limit} "
                                               f"bytes (--max-request-bytes).", "request_too_large", more)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and int(declared) > self.limit:  # the HTTP parser has checked it is a number
            return await self._too_large(receive, send, True)
        chunks, size = [], 0
        while True:
            message = await self._next(receive)
            if message is None:
                return await self._refuse(receive, send, 408, f"The request body stopped arriving for "
                                                              f"{self.timeout:g} s (--body-timeout).",
                                          "request_timeout", False)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._too_large(receive, send, message.get("more_body", False))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def confine(root: Path, requested: str, param: str = "lora_path") -> Path:
    """The real path of ``requested`` (relative to ``root``, or absolute inside it); APIError 403 otherwise.
    ``param`` is the request field that named it, for the error object."""
    if "\x00" in requested:
        raise APIError(400, f"`{param}` contains a NUL byte", param=param, code="invalid_value")
    pure = PurePosixPath(requested.replace("\\", "/"))
    if ".." in pure.parts:
        raise _outside(requested, "`..` is not allowed", param)
    real_root = Path(os.path.realpath(root))
    candidate = Path(requested) if pure.is_absolute() else real_root / pure
    real = Path(os.path.realpath(candidate))
    if not is_inside(real, real_root):
        why = "it is outside the root" if pure.is_absolute() else "it resolves (through a symlink) outside the root"
        raise _outside(requested, why, param)
    return real


def _outside(requested: str, why: str, param: str) -> APIError:
    return APIError(403, f"{param} {requested!r} is refused: adapters load only from inside --adapter-root, "
                         f"and {why}.", param=param, code="path_outside_adapter_root")
