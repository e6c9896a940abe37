"""Typed errors of one request or one adapter operation; the rest of the engine carries on.

Each class carries ``http_status``, the status an OpenAI-compatible server answers with, so the server maps
them without knowing every type.
"""

from __future__ import annotations

from ..errors import AdapterFileError, ServingError


class RequestError(ServingError):
    """A request that cannot be served as given (bad sampling parameters, too long for the context)."""

    http_status = 400


class ContextLengthError(RequestError):
    """The prompt, or the prompt plus ``max_tokens``, does not fit the model's context."""


class SamplingError(RequestError):
    """This request's sampling parameters made its next-token draw impossible (finite scores turned NaN or
    infinite by its penalties or bias, every token banned); requests beside it are not affected."""


class UnknownAdapterError(RequestError):
    """No adapter of that name is loaded (or it is being unloaded)."""

    http_status = 404


class AdapterLoadError(ServingError, AdapterFileError):
    """An adapter cannot be loaded: missing, corrupt, for another base model, or too large a rank."""

    http_status = 400


class AdapterExistsError(ServingError):
    """An adapter is already loaded under that name; unload it first."""

    http_status = 400


class GenerationError(ServingError):
    """This request's computation went wrong (non-finite scores); requests beside it are not affected."""

    http_status = 500


class QueueFullError(ServingError):
    """The waiting queue is at ``max_queue``; retry later."""

    http_status = 503


class EngineClosedError(ServingError):
    """The engine was shut down (or its loop died); nothing more is served."""

    http_status = 503


class PathOutsideAdapterRootError(AdapterLoadError):
    """An adapter loaded under a root has a file (or is itself) a symlink leading out of it
    (ftserve/confinement.py); the class name is the error code the server answers with."""

    http_status = 403


class EngineUnavailableError(ServingError):
    """No engine of that name in this install (or in this version); the message says what to use instead."""

    http_status = 400
