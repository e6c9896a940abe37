"""One strict, bounded JSON reader for everything ftserve parses from outside: adapter and model config files,
shard indexes, safetensors headers, and request bodies.

Python's ``json`` accepts what is not JSON and fails on what is in ways that are not decoding errors:
``NaN``/``Infinity`` (and ``1e999``, read as inf); integers past the digit limit (ValueError); nesting deeper
than the interpreter's recursion limit (RecursionError, a 500 in a server); ``"\\ud800"``, a lone surrogate
that no tokenizer or UTF-8 writer can handle. And ``Path.read_text`` reads a file of any size whole. Here:

- files are bounded in bytes before they are read (``stat``, then at most ``max_bytes + 1`` bytes);
- nesting is bounded by a scan of the brackets outside strings, before ``json`` builds anything;
- non-finite numbers, over-long integers and lone surrogates are refused, naming the dotted path
  (``messages.0.content``) where the value sits.

Every refusal is a StrictJSONError (a ValueError) with ``message`` and ``path``; callers word it in their own
error family (adapter file, checkpoint, HTTP 400).
"""

from __future__ import annotations

import json
import math
import os
import re
from itertools import accumulate
from pathlib import Path
from typing import Any

from ..errors import FtserveError

MAX_DEPTH = 64  # JSON config files and request bodies nest a few levels; 64 leaves room and bounds the parser
MAX_INT_DIGITS = 4300  # CPython's default int() digit limit (sys.int_info.default_max_str_digits), which json obeys

# A JSON string (unrolled loop, linear time); what is left after removing them is structure and numbers.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class StrictJSONError(ValueError):
    """JSON that is invalid, too large or too deep, or holds a value no consumer can use.

    ``message`` says what and where (it starts with the ``what`` the caller named); ``path`` is the dotted
    path of the offending value (``"messages.0.content"``, ``"<key>"`` for a key), or None when the problem is
    not one value (bad syntax, size, depth)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.message, self.path = message, path


def loads_strict(raw: bytes | str, *, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``raw`` (bytes in UTF-8, or UTF-16/32 as ``json`` detects them; or text) as strict JSON.

    ``what`` names the source in messages (``"the request body"``, ``"adapter_config.json"``). Raises
    StrictJSONError for invalid JSON, nesting deeper than ``max_depth``, NaN, Infinity, numbers that overflow
    a float, integers of more than MAX_INT_DIGITS digits, and strings or keys holding a lone surrogate.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        try:
            text = raw.decode(json.detect_encoding(raw))
        except UnicodeDecodeError as exc:
            raise StrictJSONError(f"{what} is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    else:
        text = raw
    skeleton = _STRING.sub('""', text)
    depth = max(accumulate(1 if c in "[{" else -1 for c in _NOT_BRACKET.sub("", skeleton)), default=0)
    if depth > max_depth:
        raise StrictJSONError(f"{what} is nested {depth} levels deep; at most {max_depth} are allowed")
    odd: list[_Odd] = []
    # Floats and constants are rare and pass through a check; integers (token ids) keep json's C fast path,
    # whose int() refuses more than MAX_INT_DIGITS digits, and the parse is repeated to find the one it refused.
    hooks = dict(parse_constant=lambda name: _Odd.add(odd, f"{name} is not a JSON number"),
                 parse_float=lambda s: _finite(s, odd))
    try:
        try:
            value = json.loads(text, **hooks)
        except ValueError as exc:
            if isinstance(exc, json.JSONDecodeError):
                raise
            value = json.loads(text, **hooks, parse_int=lambda s: _integer(s, odd))
    except json.JSONDecodeError as exc:
        raise StrictJSONError(f"{what} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") \
            from None
    except RecursionError:  # only with a max_depth beyond the interpreter's recursion limit
        raise StrictJSONError(f"{what} is nested too deeply to parse") from None
    except ValueError as exc:  # int()'s digit limit, where this process set it below MAX_INT_DIGITS
        raise StrictJSONError(f"{what}: {exc}") from None
    if odd:
        path = _find(value, lambda v: v is odd[0])
        raise StrictJSONError(f"{what}: {_where(path)}{odd[0].reason}", path)
    if _SURROGATE_ESCAPE.search(text):
        path = _find(value, _lone_surrogate, keys=True)
        if path is not None:
            raise StrictJSONError(f"{what}: {_where(path)}a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                                  f"without its pair), which is not text and cannot be tokenized", path)
    return value


def read_json_file(file: str | os.PathLike, *, max_bytes: int, error: type[FtserveError],
                   max_depth: int = MAX_DEPTH) -> Any:
    """A JSON file read through ``loads_strict``, refused unread when larger than ``max_bytes``; every problem
    (missing, unreadable, too large, not strict JSON) is raised as ``error`` naming the file."""
    file = Path(file)
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(max_bytes + 1) if size <= max_bytes else b""
    except OSError as exc:
        raise error(f"{file}: cannot read ({exc.strerror or exc})") from None
    if size > max_bytes or len(raw) > max_bytes:
        raise error(f"{file}: {max(size, len(raw)):,d} bytes, larger than the {max_bytes:,d} bytes such a file "
                    f"may have; it is not a file ftserve wrote or expects") from None
    try:
        return loads_strict(raw, what=str(file), max_depth=max_depth)
    except StrictJSONError as exc:
        raise error(exc.message) from None


class _Odd:
    """Stands in, during a hooked parse, for a value that is refused, so its path can be found."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    @classmethod
    def add(cls, found: list["_Odd"], reason: str) -> "_Odd":
        found.append(cls(reason))
        return found[-1]


def _finite(text: str, odd: list[_Odd]) -> float | _Odd:
    value = float(text)
    shown = text if len(text) <= 24 else f"{text[:12]}...{text[-8:]} ({len(text)} characters)"
    return value if math.isfinite(value) else _Odd.add(odd, f"the number {shown} overflows a float")


def _integer(text: str, odd: list[_Odd]) -> int | _Odd:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        return _Odd.add(odd, f"an integer of {digits:,d} digits is more than the {MAX_INT_DIGITS} allowed")
    return int(text)


def _lone_surrogate(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _find(data: Any, match, keys: bool = False) -> str | None:
    """The dotted path of the first value (or, with ``keys``, key: ``path.<key>``) for which ``match`` holds;
    iterative, so depth costs no recursion."""
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if match(value):
            return ".".join(map(str, path)) or "(top level)"
        if isinstance(value, (dict, list)):
            for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
                stack.append(((*path, key), item))
                if keys and match(key):
                    return ".".join(map(str, (*path, "<key>")))
    return None


def _where(path: str | None) -> str:
    return f"at `{path}`: " if path else ""
