"""OpenAI's error object, and the one exception type the server raises to produce it.

Every failure reaches the client as ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP
status, the shape the official client unwraps into ``openai.NotFoundError``, ``openai.AuthenticationError``
and so on. Tracebacks stay in the server's log.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Iterable

from ..errors import AdapterFileError, ServingError

logger = logging.getLogger("ftserve.server")

# OpenAI's own ``type`` strings, by status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(ServingError):
    """A request the server answers with an error object and ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_bytes(status: int, message: str, *, code: str | None = None) -> bytes:
    return json.dumps(error_body(status, message, code=code)).encode()


def model_not_found(name: str, served: Iterable[str] = (), why: str | None = None) -> APIError:
    """404 for a ``model`` field that names nothing served, with ``why`` where the caller knows more, suggesting
    the closest of the ``served`` names (a typo, a case slip)."""
    by_lower = {s.lower(): s for s in served}
    close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)]
    names = [f"`{c}`" for c in close]
    hint = f" Did you mean {', '.join(names[:-1]) + ' or ' if len(names) > 1 else ''}{names[-1]}?" if close else ""
    reason = f": {why}" if why else ""
    return APIError(404, f"The model `{name}` does not exist{reason}.{hint} GET /v1/models lists the base model and "
                         f"every loaded adapter.", param="model", code="model_not_found")


def from_exception(exc: BaseException, param: str | None = None) -> APIError:
    """The error object for anything a handler or the engine raised; ``param``: the request field an engine
    error is about, where the caller knows it (the engine does not know the request's fields)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (ServingError, AdapterFileError)):
        # Engine errors carry the status to answer with (ftserve/engine/errors.py); a bad adapter folder is 400.
        status = int(getattr(exc, "http_status", 400))
        code = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__.removesuffix("Error")).lower()
        return APIError(status, str(exc), param=param or ("model" if status == 404 else None), code=code,
                        retry_after=5 if status in (429, 503) else None)
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return APIError(500, "The server hit an internal error while handling this request; its log has the "
                         "details.", code="internal_error")


def validation_error(errors: list[dict]) -> APIError:
    """A 400 that names the first offending field of a request body, as ``param``."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request body", "type": ""}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(loc) or None
    if first.get("type") == "missing":
        message = f"`{field}` is required" if field else "The request body is missing"
    elif field:
        message = f"`{field}`: {first.get('msg', 'invalid value')}"
    else:
        message = f"The request body must be a JSON object: {first.get('msg', 'invalid value')}"
    more = len(errors) - 1
    if more > 0:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return APIError(400, message, param=field, code="invalid_value")
