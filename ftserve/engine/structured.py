"""Structured outputs through llguidance: a request's ``StructuredOutputs`` (base.py) to a compiled grammar.

The grammar is the one vLLM's ``guidance`` backend builds (vllm/v1/structured_output/backend_guidance.py,
``serialize_guidance_grammar``): ``json`` -> ``LLMatcher.grammar_from_json_schema(schema, defaults=
{"whitespace_flexible": any_whitespace})``, ``json_object`` -> the same for ``{"type": "object"}``, ``regex``,
``choice`` (its strings as a JSON list) and ``grammar`` (Lark, or GBNF) -> ``llguidance.grammar_from``. JSON is
compact unless the engine option ``structured_outputs_any_whitespace`` is set: no whitespace between tokens,
so no model can loop on blanks; JSON strings never hold raw control characters (llguidance's JSON strings).

Bounded compilation. A constraint is checked before anything compiles (``check_bounds``: at most
MAX_SPEC_CHARS characters of schema, regex, grammar or choices, MAX_SCHEMA_NODES JSON values in a schema,
nested at most MAX_SCHEMA_DEPTH deep, MAX_CHOICES choices), then compiled under llguidance's parser limits
(``_limits``) on a pool of MAX_COMPILES threads (llguidance releases the GIL while it compiles), never on the
event loop. **A
request's constraint is compiled, or refused, within COMPILE_TIMEOUT_S (5 s) of the engine taking it**;
beyond MAX_PENDING compiles waiting or running, a new one is refused at once with QueueFullError (503), so
pathological requests cannot pile up threads. A compile that outlives its requests' wait still finishes
(llguidance's limits bound it) and its result is cached.

Every refusal is a RequestError (400) whose message names the field (``structured_outputs.json``,
``.regex``, ``.grammar``, ``.choice``) and the cause. Compiled grammars are cached (LRU, CACHE_SIZE) by
(tokenizer, canonical spec, whitespace option): the cache holds one template ``LLMatcher`` per key, never
advanced, and each request gets a deep copy; a refusal is cached the same way. One ``LLTokenizer`` is built
per Hugging Face tokenizer object (an adapter may bring its own), with the model's vocabulary width and its
end-of-sequence ids, so a finished constraint lets the model end.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .base import StructuredOutputs
from .errors import EngineClosedError, QueueFullError, RequestError

MAX_SPEC_CHARS = 100_000  # a schema's canonical JSON text, a regex, a grammar, or all choices together
MAX_SCHEMA_NODES = 10_000  # JSON values (objects, arrays, strings, numbers...) in a schema
MAX_SCHEMA_DEPTH = 64  # nesting of objects and arrays in a schema's document
MAX_CHOICES = 1_000
COMPILE_TIMEOUT_S = 5.0
MAX_COMPILES = 2  # compile threads
MAX_PENDING = 16  # distinct compiles waiting or running; beyond, QueueFullError
CACHE_SIZE = 256  # compiled grammars (and refusals) kept
TOKENIZER_CACHE_SIZE = 16
ERROR_CHARS = 400  # of llguidance's message, in ours
_CAUSE = {"json": "is not a schema that can be enforced (invalid, or a keyword llguidance does not support)",
          "json_object": "does not compile", "regex": "does not compile", "choice": "does not compile",
          "grammar": "does not compile"}
LLGUIDANCE_INSTALL = "pip install 'llguidance>=1.7' (in ftserve's serve extra)"


def field_name(spec: StructuredOutputs) -> str:
    """``structured_outputs.<kind>``, the field a message about ``spec`` names."""
    return f"structured_outputs.{spec.kind()}"


def canonical(spec: StructuredOutputs) -> str:
    """The constraint as one string, the same for the same constraint however it was written: a schema's JSON
    (dict or text) re-serialized compactly, keeping its key order (llguidance emits properties in that order)."""
    kind = spec.kind()
    if kind == "json":
        schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if kind == "choice":
        return json.dumps(list(spec.choice), ensure_ascii=False)
    if kind == "json_object":
        return ""
    return getattr(spec, kind)


def check_bounds(spec: StructuredOutputs) -> None:
    """RequestError naming the field if ``spec`` is larger or deeper than this module's bounds allow; cheap
    (linear in its size), run before anything compiles. ``spec``'s types are already checked (params.py)."""
    name = field_name(spec)
    if spec.kind() == "choice" and len(spec.choice) > MAX_CHOICES:
        raise RequestError(f"{name} is too large: {len(spec.choice)} choices, at most {MAX_CHOICES}")
    try:
        text = canonical(spec)
    except (TypeError, ValueError) as exc:  # a dict holding what JSON cannot (a set, a cycle)
        raise RequestError(f"{name} is not a JSON document: {_short(str(exc))}") from None
    if len(text) > MAX_SPEC_CHARS:
        raise RequestError(f"{name} is too large: {len(text)} characters, at most {MAX_SPEC_CHARS}")
    if spec.kind() == "json":
        nodes, depth = schema_size(json.loads(text))
        if depth > MAX_SCHEMA_DEPTH:
            raise RequestError(f"{name} is too deep: nested {depth} levels, at most {MAX_SCHEMA_DEPTH}")
        if nodes > MAX_SCHEMA_NODES:
            raise RequestError(f"{name} is too large: {nodes} JSON values, at most {MAX_SCHEMA_NODES}")


def schema_size(schema: Any) -> tuple[int, int]:
    """(JSON values, deepest nesting) of a parsed JSON document, walked without recursion."""
    nodes, deepest, stack = 0, 0, [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        deepest = max(deepest, depth)
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
    return nodes, deepest


def serialize(spec: StructuredOutputs, any_whitespace: bool) -> str:
    """The llguidance grammar of ``spec``, as vLLM's ``serialize_guidance_grammar`` writes it; RequestError
    naming the field when llguidance cannot read it (a GBNF that does not parse, a schema that is no object)."""
    import llguidance

    kind = spec.kind()
    try:
        if kind in ("json", "json_object"):
            schema = canonical(spec) if kind == "json" else '{"type": "object"}'
            return llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": any_whitespace})
        return llguidance.grammar_from(kind, canonical(spec))
    except (ValueError, TypeError, KeyError) as exc:
        raise RequestError(f"{field_name(spec)} is invalid: {_short(str(exc))}") from None


@dataclass(frozen=True)
class Constraint:
    """A request's own matcher (advanced token by token as the request decodes) and ``vocab``, the width of
    its token masks (its LLTokenizer's vocabulary: at least the model's logits width)."""

    matcher: Any
    vocab: int


@dataclass
class _Compiled:
    template: Any  # an LLMatcher never advanced, or None for a refusal
    error: str | None
    hf: Any  # the Hugging Face tokenizer whose id the key holds: kept alive, so the id names it alone
    lltok: Any


class StructuredCompiler:
    """Compiles and caches constraints for one engine: ``vocab_size`` the model's logits width, ``eos_ids``
    the ids that end its sequences, ``any_whitespace`` the engine option. ``await constraint(spec, tokenizer)``
    from the event loop (module docstring: bounds, cache, errors)."""

    def __init__(self, vocab_size: int, eos_ids: frozenset[int], any_whitespace: bool = False,
                 timeout: float = COMPILE_TIMEOUT_S) -> None:
        self.vocab_size, self.eos_ids = vocab_size, sorted(eos_ids)
        self.any_whitespace, self.timeout = any_whitespace, timeout
        self._lock = threading.Lock()  # the caches are read on the event loop and filled on compile threads
        self._grammars: OrderedDict[tuple, _Compiled] = OrderedDict()
        self._tokenizers: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
        self._pending: dict[tuple, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    async def constraint(self, spec: StructuredOutputs, tokenizer: Any) -> Constraint:
        """A fresh Constraint for one request, from the cache or compiled off the event loop within
        ``timeout`` seconds; RequestError naming the field when it cannot be."""
        require_llguidance()
        name = field_name(spec)
        if tokenizer is None:
            raise RequestError(f"{name} needs a tokenizer, and this engine was built without one")
        try:
            key = (id(tokenizer), spec.kind(), canonical(spec), self.any_whitespace)
        except (TypeError, ValueError):
            key = None  # not JSON: check_bounds says so
        compiled = self._cached(key, tokenizer)
        if compiled is None:
            check_bounds(spec)
            future = self._pending.get(key)
            if future is None:
                if len(self._pending) >= MAX_PENDING:
                    raise QueueFullError(f"{MAX_PENDING} grammars are being compiled; retry {name} later")
                try:
                    future = self._executor().submit(self._compile, key, spec, tokenizer)
                except RuntimeError:  # the pool was shut down with the engine
                    raise EngineClosedError("the engine was shut down") from None
                self._pending[key] = future
                future.add_done_callback(lambda _: self._pending.pop(key, None))
            try:
                compiled = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout)
            except asyncio.TimeoutError:
                raise RequestError(f"{name} took too long to compile (more than {self.timeout:g} s); simplify "
                                   f"it") from None
        if compiled.error is not None:
            raise RequestError(compiled.error)
        return Constraint(compiled.template.deep_copy(), compiled.lltok.vocab_size)

    def _cached(self, key: tuple, tokenizer: Any) -> _Compiled | None:
        with self._lock:
            compiled = self._grammars.get(key)
            if compiled is None or compiled.hf is not tokenizer:
                return None
            self._grammars.move_to_end(key)
            return compiled

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(MAX_COMPILES, thread_name_prefix="ftserve-grammar")
        return self._pool

    def _compile(self, key: tuple, spec: StructuredOutputs, tokenizer: Any) -> _Compiled:
        """On a compile thread: the grammar, its matcher under ``_limits()``, and the cache entry (or the refusal)."""
        import llguidance

        name = field_name(spec)
        lltok = self._lltokenizer(tokenizer, name)
        try:
            matcher = llguidance.LLMatcher(lltok, serialize(spec, self.any_whitespace), log_level=0,
                                           limits=_limits())
            error = f"{name} {_CAUSE[spec.kind()]}: {_short(matcher.get_error())}" if matcher.is_error() else None
        except RequestError as exc:
            matcher, error = None, str(exc)
        compiled = _Compiled(None if error else matcher, error, tokenizer, lltok)
        with self._lock:
            self._grammars[key] = compiled
            while len(self._grammars) > CACHE_SIZE:
                self._grammars.popitem(last=False)
        return compiled

    def _lltokenizer(self, tokenizer: Any, name: str) -> Any:
        """The LLTokenizer of ``tokenizer`` (one per tokenizer object, LRU), as wide as the model's logits."""
        with self._lock:
            entry = self._tokenizers.get(id(tokenizer))
            if entry is not None and entry[0] is tokenizer:
                self._tokenizers.move_to_end(id(tokenizer))
                return entry[1]
        import llguidance.hf

        try:
            lltok = llguidance.hf.from_tokenizer(tokenizer, max(self.vocab_size, len(tokenizer)),
                                                 eos_token=self.eos_ids or None)
        except ValueError as exc:
            raise RequestError(f"{name} needs a fast (Rust) Hugging Face tokenizer: {exc}") from None
        with self._lock:
            self._tokenizers[id(tokenizer)] = (tokenizer, lltok)
            while len(self._tokenizers) > TOKENIZER_CACHE_SIZE:
                self._tokenizers.popitem(last=False)
        return lltok

    def close(self) -> None:
        """Stop taking compiles; those queued or running finish on their threads (llguidance's limits bound
        them), and their requests then meet the closed engine."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _limits() -> Any:
    import llguidance

    # llguidance's defaults (lexer fuel, Earley items per step, lexer states), but a grammar at most a fifth of
    # its default size: the largest schemas the bounds above let through still fit, and the work a compile that
    # outlives COMPILE_TIMEOUT_S goes on doing stays small.
    return llguidance.LLParserLimits(max_grammar_size=100_000, verbose_errors=False)


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= ERROR_CHARS else message[:ERROR_CHARS] + "..."


def require_llguidance() -> None:
    """RequestError saying what to install when llguidance is not."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        raise RequestError(f"structured_outputs needs the llguidance package: {LLGUIDANCE_INSTALL}") from None
