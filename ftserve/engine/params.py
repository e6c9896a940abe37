"""The ranges of the sampling parameters, checked once in the front end for every engine.

The same message and HTTP code (400, ``RequestError``) whatever engine serves the request: the torch
engine's sampler and vLLM's ``SamplingParams`` both receive only parameters that passed here.
"""

from __future__ import annotations

import json
import math

from .base import MAX_LOGPROBS, MIN_REPETITION_PENALTY, SEED_RANGE, SamplingParams, StructuredOutputs
from .errors import RequestError
from .structured import check_bounds


def check_params(params: SamplingParams) -> None:
    """A RequestError naming the first parameter out of range."""
    if isinstance(params.max_tokens, bool) or not isinstance(params.max_tokens, int) or params.max_tokens < 1:
        raise RequestError(f"max_tokens must be an integer >= 1; got {params.max_tokens!r}")
    if not isinstance(params.temperature, (int, float)) or not 0 <= params.temperature <= 100:
        raise RequestError(f"temperature must be a number in [0, 100]; got {params.temperature!r}")
    if not isinstance(params.top_p, (int, float)) or not 0 < params.top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1]; got {params.top_p!r}")
    if isinstance(params.top_k, bool) or not isinstance(params.top_k, int):
        raise RequestError(f"top_k must be an integer (0 or -1 disables it); got {params.top_k!r}")
    if params.seed is not None and (isinstance(params.seed, bool) or not isinstance(params.seed, int)
                                    or not SEED_RANGE[0] <= params.seed <= SEED_RANGE[1]):
        raise RequestError(f"seed must be a 64-bit signed integer or None; got {_short(params.seed)}")
    if any(not isinstance(s, str) or not s for s in params.stop):
        raise RequestError(f"stop must be a list of non-empty strings; got {params.stop!r}")
    if any(isinstance(t, bool) or not isinstance(t, int) for t in params.stop_token_ids):
        raise RequestError(f"stop_token_ids must be a list of integers; got {params.stop_token_ids!r}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if not _number(value) or not -2 <= value <= 2:
            raise RequestError(f"{name} must be a number in [-2, 2]; got {value!r}")
    if not _number(params.repetition_penalty) or not MIN_REPETITION_PENALTY <= params.repetition_penalty <= 10:
        raise RequestError(f"repetition_penalty must be a number in [{MIN_REPETITION_PENALTY}, 10]; got "
                           f"{params.repetition_penalty!r}")
    if not isinstance(params.logit_bias, dict) or any(
            isinstance(k, bool) or not isinstance(k, int) or not _number(v) or not -100 <= v <= 100
            for k, v in params.logit_bias.items()):
        raise RequestError(f"logit_bias must map token ids to numbers in [-100, 100]; got {params.logit_bias!r}")
    if isinstance(params.min_tokens, bool) or not isinstance(params.min_tokens, int) or not (
            0 <= params.min_tokens <= params.max_tokens):
        raise RequestError(f"min_tokens must be an integer in [0, max_tokens={params.max_tokens}]; got "
                           f"{params.min_tokens!r}")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value <= MAX_LOGPROBS):
            raise RequestError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None; got {value!r}")
    if params.structured_outputs is not None:
        check_structured(params.structured_outputs)


def check_structured(spec: StructuredOutputs) -> None:
    """A RequestError naming the field of ``spec`` whose type is wrong, or that is too large (structured.py's
    bounds); what compiles is the grammar library's to say."""
    if not isinstance(spec, StructuredOutputs):
        raise RequestError(f"structured_outputs must be a StructuredOutputs; got {_short(spec)}")
    try:
        kind = spec.kind()
    except ValueError as exc:
        raise RequestError(f"structured_outputs: {exc}") from None
    value = getattr(spec, kind)
    name = f"structured_outputs.{kind}"
    if kind == "json":
        schema = value
        if isinstance(value, str):
            try:
                schema = json.loads(value)
            except ValueError as exc:
                raise RequestError(f"{name} is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise RequestError(f"{name} must be a JSON schema (an object, or its JSON text); got {_short(value)}")
    elif kind == "choice":
        if not isinstance(value, (list, tuple)) or not value or any(not isinstance(c, str) for c in value):
            raise RequestError(f"{name} must be a non-empty list of strings; got {_short(value)}")
    elif kind == "json_object":
        if value is not True:
            raise RequestError(f"{name} must be true or unset; got {_short(value)}")
    elif not isinstance(value, str) or not value:
        raise RequestError(f"{name} must be a non-empty string; got {_short(value)}")
    check_bounds(spec)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
