"""Schemathesis hooks for ``run_schemathesis.py``: aim generated requests at served models, record every answer.

Loaded by ``st run`` through ``SCHEMATHESIS_HOOKS``; the driver passes what the server serves in the
environment: ``FUZZ_MODELS`` (the served names that requests should mostly use), ``FUZZ_PROTECTED`` (names
the load/unload routes must never touch, since the driver checks those models' output after the run),
``FUZZ_ROOT_FOLDERS`` (adapter folders under ``--adapter-root``), ``FUZZ_VOCAB`` (the tokenizer's size) and
``FUZZ_RECORD`` (a file that gets one JSON line per request, check failure or network error).

A random ``model`` string is a 404 before any sampling code runs, and a random ``max_tokens`` or ``n`` keeps
a 2-core machine busy for minutes; so before each call, most of the time, ``model`` names a served model,
``max_tokens`` <= 8, ``n`` <= 4, prompts hold a few items and token ids fall in the vocabulary; the rest of
the time the generated values go out as they are, so large ones are tried too; and now and then (HOSTILE) a
valid body is blown up into one that asks for far more work than the server allows (1,000 prompts x n = 64,
echo with 20 log probabilities and n = 128), which must be refused at once with a 4xx. A field is only ever
replaced by another valid value, which keeps a negative case negative (schemathesis re-validates the body
after a hook anyway). The choices are a function of the generated body, so a case replays (and shrinks) to
the same request.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time

import schemathesis

MODELS = os.environ.get("FUZZ_MODELS", "").split(",")
PROTECTED = set(os.environ.get("FUZZ_PROTECTED", "").split(","))
ROOT_FOLDERS = os.environ.get("FUZZ_ROOT_FOLDERS", "").split(",")
VOCAB = int(os.environ.get("FUZZ_VOCAB", "1000"))
RECORD = os.environ.get("FUZZ_RECORD")
RUNTIME_NAMES = [f"fuzz-{i}" for i in range(4)]  # what load creates and unload removes, most of the time
LORA_NAME = r"[A-Za-z0-9][A-Za-z0-9._:/-]*"  # LoadLoraAdapterRequest's pattern
AIM = 0.85  # how often each field is aimed at deep code; otherwise it goes out as generated
HOSTILE = 0.03  # how often a valid generation body is blown up to ask for more than the limits allow

_lock = threading.Lock()
_started = threading.local()


def _record(**line) -> None:
    if RECORD:
        with _lock, open(RECORD, "a") as out:
            out.write(json.dumps(line, default=repr) + "\n")


def _is_int(value) -> bool:
    """An integer in JSON Schema's sense, which counts 73.0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def _valid_name(value, max_length: int | None = None, pattern: str | None = None) -> bool:
    """Whether ``value`` is a string the document allows (at least 1 character, as the request models say)."""
    return (isinstance(value, str) and len(value) >= 1 and (max_length is None or len(value) <= max_length)
            and (pattern is None or re.fullmatch(pattern, value) is not None))


def _rng(case) -> random.Random:
    key = json.dumps([case.operation.label, case.body], sort_keys=True, default=repr)
    return random.Random(hashlib.sha256(key.encode()).digest())


def _aim_model(body: dict, rng: random.Random, optional: bool) -> None:
    """A served name most of the time; now and then a runtime-loaded one, which may or may not be there."""
    if _valid_name(body.get("model")) or (optional and "model" not in body):
        draw = rng.random()
        if draw < AIM - 0.1:
            body["model"] = rng.choice(MODELS)
        elif draw < AIM:
            body["model"] = rng.choice(RUNTIME_NAMES)


def _aim_generation(body: dict, rng: random.Random, positive: bool) -> None:
    _aim_model(body, rng, optional=False)
    for field in ("max_tokens", "max_completion_tokens"):
        if _is_int(body.get(field)) and body[field] > 8 and rng.random() < AIM:
            body[field] = rng.randint(1, 8)
    if "max_tokens" not in body and "max_completion_tokens" not in body and rng.random() < AIM:
        body["max_tokens"] = rng.randint(1, 8)
    if _is_int(body.get("n")) and 4 < body["n"] <= 128 and rng.random() < AIM:
        body["n"] = rng.randint(1, 4)
    if not positive:
        return  # cutting a list could drop the one invalid item
    for field in ("prompt", "messages"):
        if isinstance(body.get(field), list) and len(body[field]) > 4 and rng.random() < AIM:
            body[field] = body[field][:rng.randint(1, 4)]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt) and rng.random() < AIM:
        body["prompt"] = [int(t) % VOCAB for t in prompt]
    if rng.random() < HOSTILE:
        _amplify(body, rng)


def _amplify(body: dict, rng: random.Random) -> None:
    """Ask for far more than the limits allow, keeping the body valid: many choices, or a response of millions
    of log probabilities (server/cost.py refuses both before building anything)."""
    if "prompt" in body:
        if rng.random() < 0.5:
            body.update(prompt=[f"prompt {i}" for i in range(1000)], n=64)
        else:
            body.update(prompt=[rng.randrange(VOCAB) for _ in range(450)], echo=True, logprobs=20, n=128,
                        max_tokens=0)
    else:
        body.update(n=128, logprobs=True, top_logprobs=20, max_tokens=400)
        body.pop("max_completion_tokens", None)


def _aim_tokens(body: dict, rng: random.Random, positive: bool) -> None:
    _aim_model(body, rng, optional=True)
    tokens = body.get("tokens")
    if isinstance(tokens, list) and rng.random() < AIM:
        body["tokens"] = [int(t) % VOCAB if _is_int(t) else t for t in (tokens[:16] if positive else tokens)]


def _aim_adapter_api(body: dict, rng: random.Random, route: str) -> None:
    loading = route == "/v1/load_lora_adapter"
    if _valid_name(body.get("lora_name"), 256, LORA_NAME if loading else None) and rng.random() < AIM:
        body["lora_name"] = rng.choice(RUNTIME_NAMES)
    if loading and _valid_name(body.get("lora_path"), 4096) and rng.random() < AIM:
        body["lora_path"] = rng.choice(ROOT_FOLDERS)
    if isinstance(body.get("lora_name"), str) and body["lora_name"] in PROTECTED:
        body["lora_name"] = RUNTIME_NAMES[0]  # the driver compares these models' output after the run


@schemathesis.hook
def before_call(context, case, kwargs):
    _started.at = time.monotonic()
    if not isinstance(case.body, dict):
        return
    rng = _rng(case)
    meta = case.meta
    positive = meta is None or not meta.generation.mode.is_negative
    route = case.operation.path
    if route in ("/v1/completions", "/v1/chat/completions"):
        _aim_generation(case.body, rng, positive)
    elif route in ("/tokenize", "/detokenize"):
        _aim_tokens(case.body, rng, positive)
    elif route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        _aim_adapter_api(case.body, rng, route)


@schemathesis.hook
def after_call(context, case, response):
    _record(kind="response", op=case.operation.label, status=response.status_code,
            elapsed=round(response.elapsed, 3), body=case.body if response.status_code >= 500 else None)


@schemathesis.hook
def after_network_error(context, case, request):
    _record(kind="network_error", op=case.operation.label, body=case.body,
            elapsed=round(time.monotonic() - getattr(_started, "at", time.monotonic()), 3))


@schemathesis.hook
def filter_failure(context, failure, case, response):
    """Keeps every failure; only writes it down, with the body that caused it."""
    _record(kind="failure", op=case.operation.label, code=failure.code, title=failure.title,
            message=failure.message[:400], status=response.status_code, body=case.body,
            response=response.content[:400].decode("utf-8", "replace"))
    return True
